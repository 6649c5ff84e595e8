"""SMAE: Starbucks Masked Autoencoding over sub-layers and sub-dimensions (paper section 3.2).

The model is the encoder (`StarbucksEncoder` over the HF backbone), its MLM head, and a shallow
decoder (default one transformer layer: a copy of the encoder's first layer) that shares
the encoder's embeddings and MLM head. It computes what the authors' code computes
(ielab/Starbucks `smae/modeling.py`), which made the paper's numbers; where the paper's text
says otherwise, `docs/pretraining.md` lists the difference. The head's transform is cut to a
size: `T_d(h) = LayerNorm(act(W[:, :d] h[:d] + b))`, the dense layer's first `d` input columns
(a `d -> H` map), then the head's own activation and LayerNorm over the full width `H`
(modeling.py:14-27). For each size `(n, d)`:

- encoder loss: MLM on the encoder-masked tokens from the layer-`n` token states through
  `T_d` and the head's vocabulary projection (modeling.py:160);
- decoder loss: MLM on the decoder-masked tokens of the decoder, whose input is the embedded
  decoder-masked text with position 0 (CLS) replaced by the bottleneck `T_d(pool(V_n^d))`
  (modeling.py:107-109, 164): the sub-size vector the fine-tune will use (`model.pooling`: the
  CLS token's, or the mean over the real tokens) through the head's whole transform, so that it
  is layer-normalised like the embeddings beside it (the paper's Eq. 7 has the dense layer only).

loss = mean over sizes of (encoder loss + decoder loss) / 2 (modeling.py:169-171; the paper's
Eq. 8 sums the two). The head comes from the checkpoint when it has one (e.g. `BertForMaskedLM`'s
`cls.predictions.*`), else it is initialised with its output layer tied to the word embeddings
(as BERT's is); such a new head can be warmed up first with the encoder frozen
(`head_parameters`, `mlm_loss`: `pretrain.head_warmup_steps`). The decoder's layers start as
copies of the encoder's first layers as the model is built, i.e. of the checkpoint the run starts
from (the authors load the checkpoint a second time and keep its first layer, modeling.py:100,
:103); they are separate parameters, trained on their own. A resumed run loads the trained
decoder from its checkpoint's state. Only the encoder is saved (`save_encoder`), with the
bottleneck's pooling in its `starbucks.json`.
"""

from __future__ import annotations

import copy
import os
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from retrieval.errors import StarbucksError
from retrieval.losses import LossOutput
from retrieval.checkpoint import load_backbone, read_meta, save_encoder
from retrieval.encoder import StarbucksEncoder
from retrieval.sizes import SizeList
from train.masking import IGNORE


def _mlm_head(mlm: nn.Module) -> nn.Module:
    """The MLM head of an HF masked-LM model: BERT's `cls` or RoBERTa/MPNet's `lm_head`."""
    cls_head = getattr(mlm, "cls", None)
    if cls_head is not None and hasattr(getattr(cls_head, "predictions", None), "transform"):
        return cls_head
    lm_head = getattr(mlm, "lm_head", None)
    if lm_head is not None and hasattr(lm_head, "dense") and hasattr(lm_head, "layer_norm"):
        return lm_head
    raise StarbucksError(
        f"SMAE supports MLM heads of the BERT (cls.predictions) or RoBERTa (lm_head) kind, not {type(mlm).__name__}'s"
    )


def _head_parts(head: nn.Module) -> tuple[nn.Linear, object, nn.Module, nn.Linear]:
    """`(transform dense, activation, layer norm, vocab projection)` of a head found by `_mlm_head`."""
    if hasattr(head, "predictions"):
        t = head.predictions.transform
        return t.dense, t.transform_act_fn, t.LayerNorm, head.predictions.decoder
    return head.dense, F.gelu, head.layer_norm, head.decoder


def _weight_names(path: str) -> set[str] | None:
    """The weight names a checkpoint holds, read from its index or file headers (no tensors loaded);
    None when they cannot be read without downloading the weights."""
    import json

    if os.path.isdir(path):
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if os.path.isfile(os.path.join(path, index)):
                with open(os.path.join(path, index), encoding="utf-8") as f:
                    return set(json.load(f)["weight_map"])
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            from safetensors import safe_open

            with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
                return set(f.keys())
        if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            try:  # mmap needs the zip format of torch >= 1.6; an older file reads as unknown
                return set(
                    torch.load(
                        os.path.join(path, "pytorch_model.bin"), map_location="meta", weights_only=True, mmap=True
                    )
                )
            except (RuntimeError, ValueError, OSError):
                return None
        return None
    try:
        from huggingface_hub import get_safetensors_metadata

        return set(get_safetensors_metadata(path).weight_map)
    except Exception:  # offline, no safetensors on the hub, ...: unknown
        return None


def ships_mlm_head(name_or_path: str) -> bool:
    """Whether the checkpoint holds a trained MLM head (so SMAE uses it and skips the head warm-up).
    A checkpoint whose weight names cannot be read counts as headless (the warm-up's cost included)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    from retrieval.checkpoint import resolve_model_path

    path = resolve_model_path(name_or_path)
    names = _weight_names(path)
    if names is None:
        return False
    with torch.device("meta"):
        mlm = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(path))
    return _dense_key(mlm) in names


def _dense_key(mlm: nn.Module) -> str:
    """The state-dict name of the MLM head's transform dense weight (the head's first layer)."""
    dense = _head_parts(_mlm_head(mlm))[0].weight
    return next(k for k, p in mlm.named_parameters(remove_duplicate=False) if p is dense)


def _decoder_mask(config, states: torch.Tensor, attention_mask: torch.Tensor):
    """The attention mask the backbone's layers expect (None when nothing is padded)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=states, attention_mask=attention_mask)


class SMAE(nn.Module):
    """Encoder + MLM head + shallow decoder; `forward(batch)` gives the loss and its per-size terms."""

    def __init__(self, mlm: nn.Module, sizes: SizeList, decoder_layers: int = 1, pooling: str = "cls"):
        super().__init__()
        if decoder_layers < 1:
            raise StarbucksError(f"pretrain.decoder_layers = {decoder_layers} must be >= 1")
        self.encoder = StarbucksEncoder(mlm.base_model, pooling=pooling, normalize=False)
        self.sizes = SizeList(self.encoder.check(s) for s in sizes)
        self.head = _mlm_head(mlm)
        layers = self.encoder.layers
        if decoder_layers > len(layers):
            raise StarbucksError(
                f"pretrain.decoder_layers = {decoder_layers}: the decoder starts as a copy of the "
                f"encoder's first layers, and {self.encoder.name} has only {len(layers)}"
            )
        # Copies (own parameters) of the encoder's first layers as they are now: the checkpoint's.
        self.decoder = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(decoder_layers))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        sizes: SizeList,
        decoder_layers: int = 1,
        attn_implementation: str | None = "sdpa",
        pooling: str = "cls",
    ):
        """`(model, tokenizer, head_from_checkpoint)` for an HF checkpoint (hub id or directory)."""
        from transformers import AutoModelForMaskedLM

        (mlm, info), tokenizer = load_backbone(
            name_or_path, attn_implementation, auto_class=AutoModelForMaskedLM, output_loading_info=True
        )
        model = cls(mlm, sizes, decoder_layers, pooling)
        return model, tokenizer, _dense_key(mlm) not in info["missing_keys"]

    # ------------------------------------------------------------ pieces

    def transform(self, states: torch.Tensor, dim: int) -> torch.Tensor:
        """`T_d(h)` `(..., H)`: the first `dim` dims of `states` through the head's transform cut to
        them: the dense layer's first `dim` input columns, the activation, the LayerNorm (full width)."""
        dense, act, norm, _ = _head_parts(self.head)
        return norm(act(F.linear(states[..., :dim], dense.weight[:, :dim], dense.bias)))

    def bottleneck(self, states: torch.Tensor, attention_mask: torch.Tensor, dim: int) -> torch.Tensor:
        """`T_d(pool(V_n^d))` `(B, H)`: the decoder's view of a layer's token states `(B, T, H)` at `dim` dims."""
        return self.transform(self.encoder.pool(states, attention_mask, dim), dim)

    def vocab_logits(self, states: torch.Tensor, dim: int) -> torch.Tensor:
        """MLM logits of `states` cut to `dim` dims (the full head when `dim` is the hidden size)."""
        return _head_parts(self.head)[3](self.transform(states, dim))

    def decode(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the decoder layers over input embeddings `(B, T, H)`."""
        mask = _decoder_mask(self.encoder.config, inputs, attention_mask)
        states = inputs
        for layer in self.decoder:
            out = layer(states, attention_mask=mask)
            states = out[0] if isinstance(out, (tuple, list)) else out
        return states

    def _mlm_loss(self, states: torch.Tensor, labels: torch.Tensor, dim: int) -> torch.Tensor:
        """Mean cross-entropy over the labelled positions (logits only where there is a label)."""
        picked = labels != IGNORE
        if not picked.any():
            return states.sum() * 0.0
        logits = self.vocab_logits(states[picked], dim)
        return F.cross_entropy(logits.float(), labels[picked])

    # ------------------------------------------------------------ loss

    def forward(self, batch: Mapping[str, torch.Tensor]) -> LossOutput:
        """The SMAE loss of a collated batch; terms `enc/<size>`, `dec/<size>` and `loss` (detached)."""
        sizes = self.sizes
        mask = batch["attention_mask"]
        layer_states = self.encoder.hidden_states(batch, {s.layers for s in sizes})
        decoder_embedded = self.encoder.backbone.embeddings(input_ids=batch["decoder_input_ids"])
        # All sizes' decoder inputs go through the decoder in one pass: (S*B, T, H).
        decoder_inputs = torch.cat(
            [
                torch.cat(
                    [
                        self.bottleneck(layer_states[s.layers], mask, s.dim)[:, None].to(decoder_embedded.dtype),
                        decoder_embedded[:, 1:],
                    ],
                    dim=1,
                )
                for s in sizes
            ]
        )
        decoded = self.decode(decoder_inputs, mask.repeat(len(sizes), 1)).chunk(len(sizes))
        terms: dict[str, torch.Tensor] = {}
        total = decoder_embedded.new_zeros((), dtype=torch.float32)
        for s, decoder_states in zip(sizes, decoded):
            enc = self._mlm_loss(layer_states[s.layers], batch["labels"], s.dim)
            dec = self._mlm_loss(decoder_states, batch["decoder_labels"], self.encoder.hidden_size)
            terms[f"enc/{s.name}"], terms[f"dec/{s.name}"] = enc.detach(), dec.detach()
            total = total + (enc + dec) / 2
        total = total / len(sizes)
        terms["loss"] = total.detach()
        return LossOutput(total, terms)

    # ------------------------------------------------------------ head warm-up

    def head_parameters(self) -> list[nn.Parameter]:
        """What a head warm-up trains: the head's own parameters, not the word embeddings its output
        layer is tied to (those are the encoder's)."""
        tied = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.head.parameters() if id(p) not in tied]

    def mlm_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Plain MLM on the encoder-masked tokens at the full size (no gradient into the encoder)."""
        full = self.encoder.num_layers
        with torch.no_grad():
            states = self.encoder.hidden_states(batch, [full])[full]
        return self._mlm_loss(states, batch["labels"], self.encoder.hidden_size)

    # ------------------------------------------------------------ saving

    def save_encoder(self, directory: str | os.PathLike, tokenizer=None, meta: dict | None = None) -> None:
        """Write only the encoder: a plain HF backbone (no head, no decoder) plus `starbucks.json`."""
        record = {"method": "smae", "sizes": self.sizes.to_config()}
        record.update(meta or {})
        save_encoder(self.encoder, directory, tokenizer=tokenizer, meta=record)


def check_pretrained_pooling(name_or_path: str, pooling: str, allowed: bool) -> None:
    """A fine-tune from an SMAE checkpoint must pool as its bottleneck did (`model.allow_pooling_change`)."""
    meta = read_meta(name_or_path) if os.path.isdir(name_or_path) else None
    if not meta or meta.get("method") != "smae" or meta.get("pooling") == pooling or allowed:
        return
    raise StarbucksError(
        f"{name_or_path} was SMAE-pre-trained with a {meta.get('pooling')}-pooled bottleneck but model.pooling = "
        f"{pooling}, so pre-training shaped a vector this fine-tune never uses; set model.pooling="
        f"{meta.get('pooling')}, pre-train again with model.pooling={pooling}, or set model.allow_pooling_change=true"
    )
