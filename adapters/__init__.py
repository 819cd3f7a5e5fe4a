"""Thin wrappers that make foreign models (diffusers, open_clip, peft) meet the model contract.

A model here is called as ``model(x, t, r, cond)``; an adapter translates that call to the
foreign model's own signature so the trainer never needs a branch for it.
"""
