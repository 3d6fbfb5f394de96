"""LoRA in the runtime: the reference is the actor's base with adapters off (no second copy), checkpoints hold
PEFT adapters and resume exactly, final/ is a merged HF folder with the adapters beside it, in-process and two
FSDP2 workers give the same numbers, layouts LoRA does not compose with are refused before anything loads."""

import json

import pytest
import torch

pytest.importorskip("peft")

from reflow.config.loader import ConfigError  # noqa: E402
from reflow.data.batch import SampleBatch  # noqa: E402
from reflow.engines.infer import InferenceEngine  # noqa: E402
from reflow.experiments.rl import RLExperiment  # noqa: E402
from reflow.models.load import load_policy  # noqa: E402
from reflow.models.packing import token_logprobs  # noqa: E402
from reflow.runtime.graphs import graph_for  # noqa: E402
from reflow.runtime.plan import PlanError  # noqa: E402
from rl_runs import assert_same_steps, compared, rl_config, run  # noqa: E402


def lora_config(out, model, data, workers=0, plan="colocate", **algo):
    cfg = rl_config(out, model, data, workers, **algo)
    cfg.actor.lora.rank, cfg.actor.lora.alpha = 4, 8.0
    cfg.runtime.plan = plan
    cfg.data.eval = None
    return cfg


def test_the_reference_runs_on_the_actors_weights_with_adapters_off_and_loads_no_copy(debug_model, addition_data,
                                                                                      tmp_path):
    cfg = lora_config(tmp_path / "out", debug_model, addition_data)
    graph = graph_for(cfg)
    ref = graph.call("ref_inf")
    assert (ref.role, ref.weights, ref.options["adapters"]) == ("ref", "actor", "off")
    assert "ref" not in graph.weight_roles()
    cfg.ref.path = str(tmp_path)  # another reference folder: its own weights, as without LoRA
    assert graph_for(cfg).call("ref_inf").weights == "ref"


def test_reference_log_probs_after_lora_training_are_the_base_models(debug_model, addition_data, tmp_path):
    cfg = lora_config(tmp_path / "out", debug_model, addition_data)
    with RLExperiment(cfg) as exp:
        exp.run()
        worker = exp.executor.transport.worker
        assert set(worker.roles) == {"actor", "reward"}  # no reference model loaded
        actor = worker.roles["actor"].model
        assert any(p.abs().sum() > 0 for n, p in actor.named_parameters() if "lora_B" in n)  # adapters trained
        g = torch.Generator().manual_seed(0)
        seqs = [torch.randint(5, 200, (n,), generator=g) for n in (6, 9, 5)]
        batch = SampleBatch.from_sequences(range(3), {"input_ids": seqs,
                                                      "action_mask": [(torch.arange(len(s)) >= 2).long() for s in seqs]})
        out, _ = worker.run(99, "ref_inf", {"parts": [("", 1)]}, batch)
        with torch.no_grad():
            # the reference call's engine settings (the actor's micro-batches and attention) on the base model
            base, _ = InferenceEngine(load_policy(debug_model), cfg.actor.micro_batch_tokens,
                                      cfg.actor.attention).logprobs(batch, cfg.rollout.temperature)
            trained, _ = token_logprobs(actor, batch, temperature=cfg.rollout.temperature)
    assert torch.equal(out.tokens["ref_logprobs"], base)
    assert not torch.allclose(trained, base)


def test_checkpoints_hold_peft_adapters_and_final_a_merged_model_with_the_adapters(debug_model, addition_data,
                                                                                  tmp_path):
    import peft

    cfg = lora_config(tmp_path / "out", debug_model, addition_data)
    cfg.trainer.save_every = 2
    run(RLExperiment, cfg)
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "step_000002"
    assert sorted(p.name for p in (ckpt / "actor").iterdir() if "token" not in p.name and "chat" not in p.name) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(ckpt / "actor.optim.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())  # Adam moments of the adapters only
    assert json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    merged = load_policy(out / "final")  # a plain HF folder, as without LoRA
    with_adapters = peft.PeftModel.from_pretrained(load_policy(debug_model), str(out / "final" / "adapter"))
    ids = torch.randint(5, 200, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapters(input_ids=ids).logits, rtol=0,
                                   atol=1e-5)
        assert not torch.allclose(merged(input_ids=ids).logits, load_policy(debug_model)(input_ids=ids).logits)


def test_a_lora_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(debug_model, addition_data, tmp_path):
    cfg = lora_config(tmp_path / "whole", debug_model, addition_data)
    cfg.trainer.steps, cfg.trainer.save_every = 4, 2
    whole = run(RLExperiment, cfg)
    again = lora_config(tmp_path / "resumed", debug_model, addition_data)
    again.trainer.steps = 4
    resumed = run(RLExperiment, again, resume=str(tmp_path / "whole" / "checkpoints" / "step_000002"))
    assert len(resumed) == 2
    for x, y in zip(whole[2:], resumed):
        x, y = compared(x), compared(y)
        assert x.keys() == y.keys() and x
        assert x == y  # same process, same order of operations: bit for bit


def test_resuming_a_lora_checkpoint_without_lora_is_refused_naming_the_key(debug_model, addition_data, tmp_path):
    from reflow.utils.checkpoint import CheckpointError

    cfg = lora_config(tmp_path / "a", debug_model, addition_data)
    cfg.trainer.save_every = 2
    run(RLExperiment, cfg)
    plain = rl_config(tmp_path / "b", debug_model, addition_data)
    with pytest.raises(CheckpointError, match=r"holds LoRA adapters for 'actor'.*actor\.lora\.rank"):
        run(RLExperiment, plain, resume=str(tmp_path / "a" / "checkpoints" / "step_000002"))


def test_lora_under_tensor_parallel_is_refused_before_anything_loads_naming_the_key(debug_model, addition_data,
                                                                                   tmp_path):
    from reflow.experiments.loop import experiment_plan
    from reflow.runtime.roles import model_configs

    cfg = lora_config(tmp_path / "out", debug_model, addition_data, workers=2)
    graph = graph_for(cfg)
    cfg.runtime.plan = {"world_size": 2, "calls": {c: {"ranks": "0-1", "layout": "d1t2p1" if c == "actor_gen" else
                                                       "d2t1p1"} for c in graph.order}}
    with pytest.raises(PlanError, match=r"plan call 'actor_gen': actor\.lora\.rank > 0 .* not d1t2p1; use d2t1p1"):
        experiment_plan(cfg, graph, model_configs(cfg, graph))


@pytest.mark.parametrize("key, value, message", [
    ("rank", -1, r"actor\.lora\.rank must be >= 0"), ("alpha", 0.0, r"actor\.lora\.alpha must be a positive"),
    ("dropout", 1.0, r"actor\.lora\.dropout must be in \[0, 1\)"),
    ("target_modules", [], r"actor\.lora\.target_modules is empty")])
def test_bad_lora_settings_are_one_line_config_errors_naming_the_key(debug_model, addition_data, tmp_path, key, value,
                                                                     message):
    from reflow.config.loader import from_dict
    from reflow.config.schema import RLConfig

    with pytest.raises(ConfigError, match=message):
        from_dict(RLConfig, {"actor": {"path": str(debug_model), "lora": {"rank": 4, key: value}}})


def test_lora_with_an_ema_reference_is_a_config_error(debug_model):
    from reflow.config.loader import from_dict
    from reflow.config.schema import RLConfig

    with pytest.raises(ConfigError, match=r"algo\.ref_ema .* actor\.lora\.rank > 0"):
        from_dict(RLConfig, {"actor": {"path": str(debug_model), "lora": {"rank": 4}}, "algo": {"ref_ema": 0.9}})


@pytest.mark.parametrize("plan", ["colocate", "separate"])
def test_lora_gives_the_same_metrics_in_process_and_on_two_workers(ray_session, debug_model, addition_data, tmp_path,
                                                                   plan):
    """colocate: the actor trains under FSDP2 over both workers (d2) and generates on a kept replica of its base
    (only adapters move after the first step); separate: the reference runs on the actor's ranks' weights."""
    local = run(RLExperiment, lora_config(tmp_path / "local", debug_model, addition_data, 0, adv_estimator="gae"))
    ray = run(RLExperiment, lora_config(tmp_path / "ray", debug_model, addition_data, 2, plan, adv_estimator="gae"))
    assert_same_steps(local, ray)
    assert "critic/loss" in ray[0] and ray[1]["actor/kl"] > 0


def test_sft_with_lora_trains_adapters_and_writes_a_merged_final_folder(debug_model, addition_data, tmp_path):
    from reflow.config.schema import SFTConfig
    from reflow.experiments.supervised import SFTExperiment
    from rl_runs import supervised_config

    cfg = supervised_config(SFTConfig, tmp_path / "sft", debug_model, addition_data, 0, train="sft.jsonl")
    cfg.model.lora.rank = 4
    cfg.data.eval = str(addition_data / "test.jsonl")  # not the config's default path, absent from a fresh clone
    rows = run(SFTExperiment, cfg)
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    assert (tmp_path / "sft" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert load_policy(tmp_path / "sft" / "final").config.num_hidden_layers == 2


def test_a_lora_critic_trains_its_adapters_and_head_and_checkpoints_them(debug_model, addition_data, tmp_path):
    cfg = lora_config(tmp_path / "out", debug_model, addition_data, adv_estimator="gae")
    cfg.critic.lora.rank = 4
    cfg.trainer.save_every = 2
    rows = run(RLExperiment, cfg)
    assert all(r["critic/grad_norm"] > 0 for r in rows)
    adapter = json.loads((tmp_path / "out" / "checkpoints" / "step_000002" / "critic" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["score"]
