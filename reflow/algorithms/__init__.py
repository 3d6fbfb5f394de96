"""Algorithm math: pure tensor functions, registered by name. Importing the package registers them all."""

from reflow.algorithms import advantages, grpovi  # noqa: F401
