"""Hydra launcher ``hydra/launcher=modal``: each sweep job in its own Modal container."""
