"""The configuration schema of reflow's experiments (typed dataclasses; see loader.py for YAML + overrides).

    reflow train configs/grpo_addition.yaml actor.optim.lr=1e-5 rollout.n=8

Keys are grouped by role (actor, critic, ref, reward) and by stage (data, rollout, algo, trainer), the
way verl and OpenRLHF users expect to find them. `validate()` hooks check cross-field rules up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from reflow.config.loader import ConfigError


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # global grad-norm clip; 0 = off
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0

    def validate(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas needs two numbers, got {self.betas}")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAConfig:
    """LoRA adapters on the role's model (reflow/models/lora.py, through PEFT); rank 0 = train every weight."""

    rank: int = 0  # r of A [r, in] and B [out, r]
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, in training only
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # linear layers, by name
    # generation runs on "merged" weights (W + alpha/r B A, built for the call) or on the "adapters" directly
    generate: Literal["merged", "adapters"] = "merged"

    def check(self, key: str) -> None:
        """ConfigError naming `key` (e.g. "actor.lora"); called by the experiment configs, which know the role."""
        if self.rank < 0:
            raise ConfigError(f"{key}.rank must be >= 0 (0 = off), got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"{key}.alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{key}.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.target_modules:
            raise ConfigError(f"{key}.target_modules is empty; name the linear layers to adapt (e.g. [q_proj, v_proj])")


@dataclass
class ModelConfig:
    """One role's model: where it comes from and how it trains."""

    path: str | None = None  # HF model folder; None = derive from the actor (critic, ref)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = mixed precision training (fp32 master weights)
    optim: OptimConfig = field(default_factory=OptimConfig)
    micro_batch_tokens: int = 4096  # token budget of one forward/backward
    gradient_checkpointing: bool = False
    # how a packed batch is attended, see models/packing.py: "padded" bins samples first-fit decreasing into
    # rows as long as the longest one (short samples share a row, kept apart by the mask; plain right padding
    # when no two fit), "packed" puts the micro-batch in one row
    attention: Literal["padded", "packed"] = "padded"
    # the samples of a group (one prompt's n responses, a preference pair) that start with the same tokens
    # run that prefix once: groups binned into rows as long as the longest group (attention=padded; several
    # short groups share a row) or one row (packed), groups kept whole in micro-batches; the same numbers up
    # to float rounding (bench/packing.py: 1.9x faster forward + backward for 8 responses of 64 tokens after
    # a 192-token prompt)
    prefix_sharing: bool = True
    # packed rows' attention mask: "dense" [T, T] through sdpa, or "flex" (flex_attention BlockMask, compiled
    # on first use; on CPU only forward-only calls use it, training falls back to dense)
    attention_kernel: Literal["dense", "flex"] = "dense"
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DataConfig:
    train: str = "data/addition/train.jsonl"
    eval: str | None = "data/addition/test.jsonl"
    eval_size: int | None = None  # use the first N eval prompts (None = all)
    max_prompt_len: int = 256  # tokens; longer prompts are an error (or skipped with on_bad_row=skip)
    max_len: int = 512  # tokens of prompt + response (SFT and preference data)
    ptx: str | None = None  # SFT (prompt, response) file for PPO-ptx (algo.ptx_coef > 0)
    on_bad_row: Literal["error", "skip"] = "error"
    shuffle: bool = True


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16
    n: int = 8  # responses per prompt (the group size of GRPO/RLOO)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 256  # sequences decoded together
    # asynchronous training: the samples of step s may come from a policy up to max_staleness updates old
    # (generation of later steps runs while earlier steps train); 0 = synchronous
    max_staleness: int = 0
    # partial rollout (with max_staleness k > 0): a step's generation that spans weight updates is interrupted at
    # each one and its unfinished samples continue with the new weights (re-prefilled with their tokens so far),
    # every token recording the version that emitted it; false: a step's samples are generated whole by the
    # weights they started with
    partial: bool = False
    # multi-turn rollouts with a tool (reflow/envs): `rollout.env=my_env.py:MyEnv` or a built-in (calculator,
    # python); max_new_tokens is then the episode's budget of model tokens, split into turns of at most
    # max_turn_tokens (null: max_new_tokens); observations are cut to max_obs_tokens; a model turn ends at EOS
    # or at turn_end (a text that is one token, e.g. "\n"); env_threads: env.step calls run at once
    env: str | None = None
    max_turns: int = 4
    max_turn_tokens: int | None = None
    max_obs_tokens: int = 256
    turn_end: str | None = None
    env_threads: int = 16

    def validate(self):
        for key in ("max_turns", "env_threads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rollout.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_turn_tokens is not None and not 1 <= self.max_turn_tokens <= self.max_new_tokens:
            raise ConfigError(f"rollout.max_turn_tokens must be in [1, rollout.max_new_tokens={self.max_new_tokens}] "
                              f"(the episode's budget), got {self.max_turn_tokens}")
        if self.max_obs_tokens < 0:
            raise ConfigError(f"rollout.max_obs_tokens must be >= 0, got {self.max_obs_tokens}")
        if self.env is not None and not str(self.env).strip():
            raise ConfigError("rollout.env must name an environment class ('file.py:Class', 'module:Class', "
                              "calculator or python), or be null")
        if self.turn_end is not None and self.env is None:
            raise ConfigError("rollout.turn_end ends a model turn of a multi-turn rollout: set rollout.env too")
        if self.max_staleness < 0:
            raise ConfigError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.partial and self.env is not None:
            raise ConfigError("rollout.partial continues single-turn generations; multi-turn rollouts (rollout.env) "
                              "are generated whole: set rollout.partial=false")
        if self.n < 1 or self.prompts_per_step < 1:
            raise ConfigError("rollout.n and rollout.prompts_per_step must be >= 1")
        if self.temperature <= 0:
            raise ConfigError("rollout.temperature must be > 0 (use eval/generate --greedy for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class RewardConfig:
    fn: str | None = "exact_match"  # built-in name or "module:function" / "file.py:function"
    model: str | None = None  # reward-model folder (from `reflow rm`); used when fn is null
    clip: float | None = None  # clip scores to [-clip, clip]
    # Process rewards (Gao et al. 2024): a PRM scores each step of a response (steps split by prm_sep);
    # "module:function" / "file.py:function" taking (prompts, responses, steps) -> per-step scores, or a
    # reward-model folder scored at each step's last token. Refined, scaled by prm_coef, added to the token rewards.
    prm: str | None = None
    prm_refine: Literal["clip", "delta", "clip+delta", "none"] = "clip"
    prm_eta: float = 0.0  # Clip: r_k -> min(r_k - eta, 0)
    prm_sep: str = "\n"
    prm_coef: float = 1.0
    # Sandboxed reward functions (reflow/rewards/sandbox.py): each call in a subprocess with these limits and no
    # network; None = on for user code (file / module specs) and code_exec, off for the other builtins.
    sandbox: bool | None = None
    timeout_s: float = 30.0  # per call of the function (a chunk of the batch, or one sample when retried)
    on_error: float = 0.0  # the reward of a sample that fails alone (timeout, crash, exception, invalid value)
    memory_mb: int = 2048  # address space per process (RLIMIT_AS)
    cpu_s: float | None = None  # CPU seconds per process (RLIMIT_CPU); None = timeout_s
    workers: int = 2  # sandbox processes working on a batch in parallel

    def validate(self):
        if self.fn is not None and self.model is not None:
            raise ConfigError("set exactly one of reward.fn (a reward function) and reward.model (a reward-model folder)")
        if self.prm is not None and not self.prm_sep:
            raise ConfigError("reward.prm_sep must be a non-empty step separator")
        if not self.timeout_s > 0 or not math.isfinite(self.timeout_s):
            raise ConfigError(f"reward.timeout_s must be a positive number of seconds, got {self.timeout_s}")
        if not math.isfinite(self.on_error):
            raise ConfigError(f"reward.on_error must be a finite number, got {self.on_error}")
        if self.memory_mb < 64:
            raise ConfigError(f"reward.memory_mb must be >= 64 (MB of address space per process), got {self.memory_mb}")
        if self.cpu_s is not None and not (self.cpu_s > 0 and math.isfinite(self.cpu_s)):
            raise ConfigError(f"reward.cpu_s must be a positive number of CPU seconds (or null: timeout_s), "
                              f"got {self.cpu_s}")
        if self.workers < 1:
            raise ConfigError(f"reward.workers must be >= 1 (sandbox processes), got {self.workers}")


@dataclass
class AlgoConfig:
    name: Literal["grpo", "ppo"] = "grpo"
    # gae | grpo | drgrpo | rloo | reinforce++ | reinforce++-baseline | remax | grpovi (None = by name)
    adv_estimator: str | None = None
    norm_std: bool = True  # GRPO: divide by the group std (False = Dr.GRPO)
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True  # PPO: whiten GAE advantages over the batch
    # the policy-gradient loss (reflow/algorithms/losses.py, policy_losses.py): ppo (clipped surrogate), gspo
    # (sequence-level ratio and clipping), cispo (clipped stop-gradient IS weight on every token's log-prob),
    # clip_cov / kl_cov (entropy-collapse control on the tokens of highest covariance of log-prob and advantage)
    policy_loss: Literal["ppo", "gspo", "cispo", "clip_cov", "kl_cov"] = "ppo"
    clip_low: float | None = None  # None: the loss's own (ppo / clip_cov 0.2, gspo 3e-4, cispo: no lower bound)
    clip_high: float | None = None  # None: ppo / clip_cov 0.2, gspo 4e-4, cispo 0.28; > clip_low = DAPO's clip-higher
    dual_clip: float | None = None  # dual-clip PPO: cap the loss of negative-advantage tokens at dual_clip * |A|
    clip_cov_ratio: float = 2e-4  # clip_cov: share of tokens whose gradient is cut
    clip_cov_lb: float = 1.0  # clip_cov: covariance bounds of the candidates
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4  # kl_cov: share of tokens that get the KL penalty
    ppo_kl_coef: float = 1.0  # kl_cov: its coefficient
    # rollout correction: the generator's log-probs differ from the trainer's (bf16, another engine, staleness);
    # tis = truncated importance sampling, mis = masked (tokens / sequences outside [lower, upper] are dropped)
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    rollout_correction_level: Literal["token", "sequence", "geometric"] = "token"
    rollout_is_threshold: float = 2.0  # tis: the weight's cap
    rollout_mis_upper: float = 2.0
    rollout_mis_lower: float | None = None  # None: 1 / upper
    # DAPO's overlong reward shaping: a soft penalty over the last overlong_cache tokens of rollout.max_new_tokens
    overlong_cache: int | None = None
    overlong_factor: float = 1.0
    # DAPO's dynamic sampling: drop groups whose rewards are all equal (no gradient) and generate more prompts,
    # up to dynamic_sampling_rounds rounds of rollout.prompts_per_step, until that many groups are kept
    dynamic_sampling: bool = False
    dynamic_sampling_rounds: int = 3
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    value_clip: float | None = 0.2
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["reward", "loss"] | None = None  # None = ppo: reward, grpo: loss
    kl_target: float | None = None  # adaptive KL controller when set
    kl_horizon: int = 10000
    kl_metric: bool = True  # report KL to the reference even when kl_coef = 0 (one reference forward per step)
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer steps per epoch over the rollout batch
    # GRPOVI: rewards are bounded in [grpovi_low, grpovi_high] (None = the reward function's declared range)
    grpovi_low: float | None = None
    grpovi_high: float | None = None
    # "Is DPO superior to PPO?": the reference follows the actor, ref <- a * ref + (1 - a) * actor every k steps
    ref_ema: float | None = None
    ref_ema_every: int = 1
    # DeepSpeed-Chat: PPO-ptx mixes ptx_coef * SFT NLL on data.ptx into the actor loss; an EMA copy of the actor
    ptx_coef: float = 0.0
    ptx_batch_size: int = 32
    actor_ema: float | None = None  # e.g. 0.992; saved as ema_actor/ in checkpoints and final_ema/
    # a user's own algorithm: "file.py:function" or "module:function", a function cfg -> Graph
    graph: str | None = None

    @property
    def estimator(self) -> str:
        return self.adv_estimator or ("gae" if self.name == "ppo" else "grpo")

    @property
    def kl_placement(self) -> str:
        return self.kl_in or ("reward" if self.name == "ppo" else "loss")

    @property
    def uses_critic(self) -> bool:
        return self.estimator == "gae"

    def policy_loss_options(self) -> dict:
        """The keyword options of the selected policy loss (its own clip defaults where clip_* are unset)."""
        clip = {"ppo": (0.2, 0.2), "clip_cov": (0.2, 0.2), "gspo": (3e-4, 4e-4), "cispo": (None, 0.28)}
        o: dict = {"agg": self.loss_agg}
        if self.policy_loss in clip:
            low, high = clip[self.policy_loss]
            o["clip_low"] = self.clip_low if self.clip_low is not None else low
            o["clip_high"] = self.clip_high if self.clip_high is not None else high
        if self.policy_loss == "ppo":
            o["dual_clip"] = self.dual_clip
        if self.policy_loss == "clip_cov":
            o.update(clip_cov_ratio=self.clip_cov_ratio, clip_cov_lb=self.clip_cov_lb, clip_cov_ub=self.clip_cov_ub)
        if self.policy_loss == "kl_cov":
            o.update(kl_cov_ratio=self.kl_cov_ratio, ppo_kl_coef=self.ppo_kl_coef)
        return o

    def validate(self):
        from reflow.algorithms.registry import ADVANTAGE_ESTIMATORS
        import reflow.algorithms  # noqa: F401  (registers the estimators)

        if self.estimator not in ADVANTAGE_ESTIMATORS:
            raise ConfigError(f"algo.adv_estimator '{self.estimator}' is unknown; choose one of: "
                              f"{', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
        if self.ppo_epochs < 1 or self.mini_batches < 1:
            raise ConfigError("algo.ppo_epochs and algo.mini_batches must be >= 1")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"algo.dual_clip must be > 1 (typically 3), got {self.dual_clip}")
        if self.dual_clip is not None and self.policy_loss != "ppo":
            raise ConfigError(f"algo.dual_clip applies to algo.policy_loss=ppo, not {self.policy_loss}")
        if self.rollout_correction == "tis" and self.rollout_correction_level == "geometric":
            raise ConfigError("algo.rollout_correction=tis needs rollout_correction_level token or sequence: a "
                              "geometric mean is a filter (mis), not an importance weight")
        if self.dynamic_sampling_rounds < 1:
            raise ConfigError(f"algo.dynamic_sampling_rounds must be >= 1, got {self.dynamic_sampling_rounds}")
        if self.overlong_cache is not None and self.overlong_cache < 1:
            raise ConfigError(f"algo.overlong_cache must be >= 1 tokens (or null), got {self.overlong_cache}")
        for key in ("ref_ema", "actor_ema"):
            v = getattr(self, key)
            if v is not None and not 0 <= v < 1:
                raise ConfigError(f"algo.{key} must be in [0, 1), got {v}")
        if self.ref_ema_every < 1:
            raise ConfigError("algo.ref_ema_every must be >= 1")


@dataclass
class RehearsalConfig:
    """Selective rehearsal (Peng et al. 2023): coef * SFT NLL on a batch of the rehearsal set (prompt + response
    rows, from `reflow rehearse`) joins every actor optimizer step, like PPO-ptx but on the selected set."""

    data: str | None = None  # JSONL / Parquet of (prompt, response) rows; None = off
    coef: float = 0.01  # the paper's recipe
    batch_size: int = 8  # rehearsal rows per optimizer step
    # select the data inside `reflow train` first (the `reflow rehearse` pass, with the actor as the SFT
    # policy, into output_dir/rehearse/): its PPO prompts become data.train and its rehearsal set
    # rehearsal.data. None = give rehearsal.data (or nothing: off)
    select: RehearseSelection | None = None

    def validate(self):
        if self.select is not None:
            if self.data is not None:
                raise ConfigError("rehearsal.select makes the rehearsal data (into output_dir/rehearse/); drop "
                                  "rehearsal.data, or drop rehearsal.select to use that file")
            try:
                self.select.validate()
            except ConfigError as e:
                raise ConfigError(f"rehearsal.select.{e}") from None
        if not (self.coef >= 0 and math.isfinite(self.coef)):
            raise ConfigError(f"rehearsal.coef must be a finite number >= 0, got {self.coef}")
        if self.batch_size < 1:
            raise ConfigError(f"rehearsal.batch_size must be >= 1 rows per optimizer step, got {self.batch_size}")

    @property
    def enabled(self) -> bool:
        return (self.data is not None or self.select is not None) and self.coef > 0


@dataclass
class TrainerConfig:
    steps: int = 100
    eval_every: int = 10  # 0 = only at the end
    save_every: int = 50  # 0 = only at the end
    keep_checkpoints: int = 2  # the newest K checkpoints are kept (0 = all)
    # a NaN / inf loss or gradient norm: skip the update (counted as <role>/nonfinite_skipped) or stop the run
    # naming the step, the call and the samples with non-finite values
    on_nonfinite: Literal["skip", "stop"] = "skip"
    tensorboard: bool = False
    progress: bool = True  # rich progress bar on the console
    eval_max_new_tokens: int | None = None  # None = rollout.max_new_tokens


@dataclass
class RuntimeConfig:
    """Where the calls of a step run: one executor, two transports. workers = 0: one local worker in this
    process (no Ray, no process group, every call d1t1p1); N >= 1: N Ray workers (one per device, one
    torch.distributed world) running the same graph and calls under `plan`."""

    workers: int = 0
    plan: str = "colocate"  # colocate | separate | path of a plan YAML (see `reflow plan show`)
    ray_address: str | None = None  # None: start an embedded Ray; "auto" or host:port: join a cluster
    timeline: bool = False  # also write <output_dir>/timeline.json (Chrome trace: chrome://tracing, Perfetto)
    offload_frozen: bool = False  # park frozen roles' weights in host memory between their calls
    timeout_s: float = 120.0  # collective timeout: a dead or stuck worker ends the run within about this
    # a worker that dies or hangs: restart the workers and resume from the last checkpoint, up to N times
    # (counted as run/restarts in the metrics); 0 = the run ends with the worker's error
    max_restarts: int = 0
    threads_per_worker: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda:<local rank> when CUDA is available, else cpu
    # on CPU, keep freed host memory in glibc's heap for the next step instead of page-faulting fresh pages
    # for every large tensor (reflow/utils/host_memory.py; ~10% of a real model's CPU step, more resident memory)
    tune_host_allocator: bool = True

    def validate(self):
        if self.workers < 0:
            raise ConfigError(f"runtime.workers must be >= 0, got {self.workers}")
        if self.max_restarts < 0:
            raise ConfigError(f"runtime.max_restarts must be >= 0, got {self.max_restarts}")
        if self.timeout_s <= 0:
            raise ConfigError(f"runtime.timeout_s must be > 0 seconds, got {self.timeout_s}")


@dataclass
class FusionConfig:
    """RLHFuse's inter-stage fusion: a generation call hands on its finished samples in chunks of `chunk`, and
    the calls that work per sample (reward, ref_inf, critic_inf, actor_inf) start on each chunk while the long
    tail still generates; train calls wait for the whole batch. The numbers do not change, only the timing:
    the overlap comes from consumers on ranks that do not generate (on ranks that do, a chunk waits for the
    generation to end; in one process, runtime.workers=0, every chunk runs after it).

    migrate_below (long-tail migration, reflow/runtime/migrate.py): once fewer than migrate_below x the batch's
    samples are unfinished, a streamed generate call's data-parallel replicas move them onto as few replicas as
    hold them (rollout.batch_size rows each) and the others end, freeing their ranks for the consumers; 0 = off.
    Needs inter_stage; a generate call on one replica (any call in one process) has nothing to move."""

    inter_stage: bool = False
    chunk: int = 8  # samples per chunk (per generation replica)
    migrate_below: float = 0.0  # fraction of the batch; 0 = no migration

    def validate(self):
        if self.chunk < 1:
            raise ConfigError(f"fusion.chunk must be >= 1 samples per chunk, got {self.chunk}")
        if not 0 <= self.migrate_below <= 1:
            raise ConfigError(f"fusion.migrate_below is a fraction of the batch in [0, 1] (0 = off), got "
                              f"{self.migrate_below}")


@dataclass
class RLConfig:
    """`reflow train`: RL from a reward (GRPO, PPO)."""

    output_dir: str = "runs/rl"
    seed: int = 0
    actor: ModelConfig = field(default_factory=ModelConfig)
    critic: ModelConfig = field(default_factory=ModelConfig)
    ref: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rehearsal: RehearsalConfig = field(default_factory=RehearsalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def validate(self):
        if self.actor.path is None:
            raise ConfigError("actor.path is required: a HF model folder (e.g. the output of `reflow sft`)")
        if self.reward.fn is None and self.reward.model is None and self.rollout.env is None:
            raise ConfigError("set exactly one of reward.fn (a reward function) and reward.model (a reward-model folder)"
                              " (or rollout.env, whose rewards can stand alone)")
        if self.rollout.env is not None:
            if self.reward.prm is not None:
                raise ConfigError("reward.prm splits a single response into steps; with rollout.env the env's per-turn "
                                  "rewards are the process rewards: unset reward.prm")
            if self.algo.estimator == "remax":
                raise ConfigError("algo.adv_estimator=remax decodes a single-turn greedy baseline, which a "
                                  "multi-turn rollout (rollout.env) has no equivalent of; use grpo, rloo or gae")
        if self.reward.prm is not None and self.algo.estimator not in ("gae", "reinforce++", "reinforce++-baseline"):
            raise ConfigError(f"reward.prm gives per-step (token) rewards, which algo.adv_estimator="
                              f"'{self.algo.estimator}' ignores; use gae, reinforce++ or reinforce++-baseline")
        if self.algo.ptx_coef > 0 and not self.data.ptx:
            raise ConfigError("algo.ptx_coef > 0 needs data.ptx: an SFT file of (prompt, response) rows")
        if self.algo.ref_ema is not None and not (self.algo.kl_coef > 0 or self.algo.kl_metric):
            raise ConfigError("algo.ref_ema needs a reference model: set algo.kl_coef > 0 or algo.kl_metric=true")
        if self.algo.dynamic_sampling and self.rollout.max_staleness > 0:
            raise ConfigError("algo.dynamic_sampling waits for each round's rewards before it generates more, so it "
                              "cannot run ahead: use it with rollout.max_staleness=0")
        if self.fusion.inter_stage and self.rollout.max_staleness > 0:
            raise ConfigError("fusion.inter_stage streams samples within a step, and rollout.max_staleness > 0 runs "
                              "rollouts ahead of training: set one of them off (fusion.inter_stage=false)")
        if self.fusion.migrate_below > 0 and not self.fusion.inter_stage:
            raise ConfigError("fusion.migrate_below moves the long tail of a streamed generate call so that its other "
                              "ranks run the consumers' chunks: set fusion.inter_stage=true too, or "
                              "fusion.migrate_below=0")
        if self.algo.dynamic_sampling and self.algo.uses_critic:
            raise ConfigError("algo.dynamic_sampling filters groups of samples: use a group estimator "
                              "(grpo, drgrpo, rloo, ...), not gae")
        if self.algo.overlong_cache is not None and self.algo.overlong_cache > self.rollout.max_new_tokens:
            raise ConfigError(f"algo.overlong_cache={self.algo.overlong_cache} is longer than rollout.max_new_tokens="
                              f"{self.rollout.max_new_tokens}")
        if self.algo.estimator == "grpovi" and self.algo.kl_placement == "reward" and self.algo.kl_coef > 0:
            raise ConfigError("algo.adv_estimator=grpovi weights whole-sequence rewards and ignores per-token KL in "
                              "the reward: set algo.kl_in=loss")
        if self.algo.estimator == "grpovi" and not self.algo.kl_metric and self.algo.kl_coef == 0:
            raise ConfigError("algo.adv_estimator=grpovi weights samples by the reference model: "
                              "set algo.kl_metric=true or algo.kl_coef > 0")
        for role in ("actor", "critic", "ref"):
            getattr(self, role).lora.check(f"{role}.lora")
        if self.actor.lora.rank and self.algo.ref_ema is not None:
            raise ConfigError("algo.ref_ema mixes the actor's weights into a reference copy, which actor.lora.rank > 0 "
                              "does not keep (the reference is the base with adapters off); unset one of them")
        if self.actor.lora.rank and self.algo.actor_ema is not None:
            raise ConfigError("algo.actor_ema is not supported with actor.lora.rank > 0; unset algo.actor_ema")
        if self.ref.lora.rank:
            raise ConfigError("ref.lora.rank: the reference is never trained; with actor.lora.rank > 0 it is the "
                              "actor's base with adapters off")
        if self.rollout.prompts_per_step * self.rollout.n < self.algo.mini_batches:
            raise ConfigError("algo.mini_batches is larger than the number of samples per step "
                              "(rollout.prompts_per_step * rollout.n)")


@dataclass
class SFTConfig:
    """`reflow sft`: supervised fine-tuning on (prompt, response) pairs."""

    output_dir: str = "runs/sft"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train="data/addition/sft.jsonl"))
    batch_size: int = 64  # samples per optimizer step
    epochs: int = 1
    max_steps: int | None = None  # stop early after this many optimizer steps
    eval_every: int = 0  # evaluate exact-match accuracy every N steps (0 = only at the end)
    eval_max_new_tokens: int = 16
    save_every: int = 0
    on_nonfinite: Literal["skip", "stop"] = "skip"  # a NaN / inf loss or gradient norm: skip the update or stop
    tensorboard: bool = False
    progress: bool = True
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self):
        if self.model.path is None:
            raise ConfigError("model.path is required: a HF model folder (e.g. from `reflow init-model`)")
        self.model.lora.check("model.lora")


@dataclass
class RMConfig:
    """`reflow rm`: a pairwise (Bradley-Terry) reward model on (prompt, chosen, rejected) rows."""

    output_dir: str = "runs/rm"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train="data/addition/pairs.jsonl", eval=None))
    batch_size: int = 32  # pairs per optimizer step
    epochs: int = 1
    max_steps: int | None = None
    eval_fraction: float = 0.1  # held-out share of the pairs for accuracy
    eval_every: int = 0  # ranking accuracy on the held-out pairs every N steps (0 = only at the end)
    save_every: int = 0
    on_nonfinite: Literal["skip", "stop"] = "skip"  # a NaN / inf loss or gradient norm: skip the update or stop
    tensorboard: bool = False
    progress: bool = True
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self):
        if self.model.path is None:
            raise ConfigError("model.path is required: a HF model folder")
        self.model.lora.check("model.lora")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass
class AMConfig(RMConfig):
    """`reflow am`: an advantage model (reflow/algorithms/advantage_model.py): the pairwise loss on
    (prompt, chosen, rejected) rows, plus scores centred per prompt under `samples_per_prompt` responses the
    SFT policy samples for each pair's prompt every step, plus an L2 bound on the scores averaged per task
    (the rows' `task` column, where given)."""

    output_dir: str = "runs/am"
    policy: ModelConfig = field(default_factory=ModelConfig)  # the SFT policy (path None = model.path); frozen
    samples_per_prompt: int = 4  # K: SFT responses per prompt, the Monte-Carlo estimate of E_{pi_SFT}[s]
    max_new_tokens: int = 16
    temperature: float = 1.0
    centre_coef: float = 1.0
    bound_coef: float = 0.01

    def validate(self):
        super().validate()
        if self.samples_per_prompt < 1:
            raise ConfigError(f"samples_per_prompt must be >= 1 SFT responses per prompt, got {self.samples_per_prompt}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        for key in ("centre_coef", "bound_coef"):
            v = getattr(self, key)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{key} must be a finite number >= 0, got {v}")


@dataclass
class RehearseSelection:
    """Selective rehearsal's data selection (`reflow rehearse`, or `rehearsal.select` inside `reflow train`):
    embed the prompts, cluster them (k-means), sample `samples_per_prompt` responses per prompt from the SFT
    policy, score them with the advantage model `am`, and select the PPO prompts and the rehearsal set."""

    am: str | None = None  # the advantage-model folder (`reflow am`)
    embedder: str | None = None  # a sentence-embedding model folder; None = the policy's mean hidden state
    clusters: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    rehearse_per_cluster: int = 4  # rehearsal rows per cluster (its top-ranked responses)
    ppo_per_cluster: int | None = None  # PPO prompts per cluster (None = every prompt not rehearsed)
    min_advantage: float = 0.0  # a rehearsed response scores above this (0: better than the policy's average)
    batch_size: int = 64  # sequences per generation / forward batch

    def validate(self):
        if self.am is None:
            raise ConfigError("am is required: the advantage-model folder written by `reflow am`")
        for key in ("clusters", "samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.rehearse_per_cluster < 0:
            raise ConfigError(f"rehearse_per_cluster must be >= 0, got {self.rehearse_per_cluster}")
        if self.ppo_per_cluster is not None and self.ppo_per_cluster < 0:
            raise ConfigError(f"ppo_per_cluster must be >= 0 (or null: all), got {self.ppo_per_cluster}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class RehearseConfig(RehearseSelection):
    """`reflow rehearse`: the selection (RehearseSelection) of data.train's prompts with the SFT policy
    `policy`, written to output_dir as ppo_prompts.jsonl, rehearsal.jsonl and clusters.json."""

    output_dir: str = "runs/rehearse"
    seed: int = 0
    policy: ModelConfig = field(default_factory=ModelConfig)  # the SFT policy: samples (and embeds) the prompts
    data: DataConfig = field(default_factory=lambda: DataConfig(train="data/addition/train.jsonl", eval=None))

    def validate(self):
        if self.policy.path is None:
            raise ConfigError("policy.path is required: the SFT policy's HF folder")
        super().validate()


@dataclass
class DPOConfig:
    """`reflow dpo`: direct preference optimisation on (prompt, chosen, rejected) rows against a frozen reference."""

    output_dir: str = "runs/dpo"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    ref: ModelConfig = field(default_factory=ModelConfig)  # path None = model.path (the usual SFT reference)
    data: DataConfig = field(default_factory=lambda: DataConfig(train="data/addition/pairs.jsonl"))
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO (Rafailov et al.) or IPO (Azar et al.)
    # IPO on per-token mean log-probs of each completion (TRL's definition); false: on their sums
    ipo_average: bool = True
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO: the preference label is flipped with this probability
    batch_size: int = 32  # pairs per optimizer step
    epochs: int = 1
    max_steps: int | None = None
    eval_fraction: float = 0.1  # held-out share of the pairs: implicit-reward accuracy
    eval_every: int = 0
    eval_max_new_tokens: int = 16  # generation accuracy on data.eval (when set)
    save_every: int = 0
    on_nonfinite: Literal["skip", "stop"] = "skip"  # a NaN / inf loss or gradient norm: skip the update or stop
    tensorboard: bool = False
    progress: bool = True
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self):
        if self.model.path is None:
            raise ConfigError("model.path is required: the policy to train (usually the SFT model)")
        self.model.lora.check("model.lora")
        if self.ref.lora.rank:
            raise ConfigError("ref.lora.rank: the reference is never trained; with model.lora.rank > 0 it is the "
                              "model's base with adapters off")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
