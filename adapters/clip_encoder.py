"""Frozen open_clip encoders: the CLIP features the GLIDE adapter is conditioned on.

``encode_text`` feeds the adapter's text conditioning and the embedding cache, ``encode_image`` the
image-conditioned use; both give L2-normalised float32 embeddings (raw CLIP embeddings have norms
around 7-10, which the notes found unstable as conditioning).
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.open_clip_loader import CLIPImageTransform, embedding_dim, load_open_clip


class FrozenClip(nn.Module):
    """open_clip's text and image towers, frozen and in eval mode, giving L2-normalised float32 embeddings.

    ``encode_text(captions)`` for the adapter's text conditioning and the embedding cache;
    ``encode_image(images in [-1, 1])`` for image-conditioned use (the model's own resize, crop and
    normalisation, on tensors). ``dim`` is the embedding width, read from the model.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str = "openai",
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.model_name = model_name
        self.pretrained = pretrained
        self.model = load_open_clip(model_name, pretrained, device, cache_dir).requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.transform = CLIPImageTransform.from_model(self.model)
        self.dim = embedding_dim(self.model, model_name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> FrozenClip:
        """Always eval: a frozen encoder's dropout and norms never switch to training behaviour."""
        return super().train(False)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Tensor:
        """(B, dim) unit-norm float32 embeddings of ``captions``, on the model's device."""
        tokens = self.tokenizer(list(captions)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """(B, dim) unit-norm float32 embeddings of (B, 3, H, W) images in [-1, 1]."""
        pixels = self.transform(((images.float() + 1) / 2).to(self.device))
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)
