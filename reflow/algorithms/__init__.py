"""Algorithm math: pure tensor functions, registered by name. Importing the package registers them all."""

from reflow.algorithms import advantages, grpovi, losses, policy_losses  # noqa: F401
