"""Backbones beyond BERT: early exit, per-size pooling, a training step, encoding and SMAE for each
listed architecture (tiny random configs built here, MiniLM's tokenizer). A size `(n, d)`'s vector is
what the model cut to `n` layers outputs (after the final norm of a backbone that has one), pooled, its
first `d` dims: the full model, a cut one saved and reloaded, and an export agree."""

import copy
import json

import pytest
import torch
import yaml

from retrieval.config import load_config
from retrieval.errors import StarbucksError
from retrieval.checkpoint import load_encoder, resolve_model_path, save_encoder
from retrieval.encoder import StarbucksEncoder, tokenize
from retrieval.sizes import Size, SizeList

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
VOCAB = 30522  # MiniLM's (BERT's) tokenizer; pad 0, CLS 101, SEP 102
SIZES = SizeList([Size("a", 1, 8), Size("b", 2, 16), Size("c", 3, 24), Size("d", 4, 32)])
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
    pad_token_id=0,
)
ARCHS = ["bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "modernbert"]
MLM_HEAD_SUPPORTED = {"bert", "roberta", "xlm-roberta", "mpnet"}
TEXTS = ["a daemon for zeroconf networking", "library", "the fast multithreaded preprocessor of a gtk runtime"]


FINAL_NORM = {"modernbert": "final_norm", "xlm-roberta-xl": "encoder.LayerNorm"}  # the others: none
CUT_ARCHS = ARCHS + ["xlm-roberta-xl"]  # a final norm in the encoder, not the model


def config(arch: str, layers: int = 4):
    """The tiny config of `arch` with `layers` layers (a per-layer pattern built for that many)."""
    import transformers as T

    shape = {**SHAPE, "num_hidden_layers": layers}
    if arch == "distilbert":  # its own names for the same shape
        return T.DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            n_layers=layers,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=128,
            pad_token_id=0,
        )
    if arch == "electra":  # embeddings narrower than the layers (ELECTRA's projection)
        return T.ElectraConfig(**shape, embedding_size=16)
    if arch == "modernbert":  # alternating global / sliding-window layers, rotary positions, a final norm
        return T.ModernBertConfig(
            **shape,
            global_attn_every_n_layers=2,
            local_attention=4,
            bos_token_id=101,
            eos_token_id=102,
            cls_token_id=101,
            sep_token_id=102,
        )
    classes = {
        "bert": T.BertConfig,
        "roberta": T.RobertaConfig,
        "xlm-roberta": T.XLMRobertaConfig,
        "mpnet": T.MPNetConfig,
        "xlm-roberta-xl": T.XLMRobertaXLConfig,
    }
    return classes[arch](**shape)


def assert_near(got, want, rel=1e-5):
    """Each row within `rel` of the expected row, relative to the expected row's norm."""
    assert got.shape == want.shape
    err = torch.linalg.vector_norm(got.float() - want.float(), dim=-1)
    scale = torch.linalg.vector_norm(want.float(), dim=-1)
    assert (err <= rel * scale).all(), f"relative error {(err / scale).max().item():.2e} > {rel}"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


def saved_backbone(arch, directory, tokenizer):
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(config(arch)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def by_hand(h, batch, size, pooling):
    h = h[..., : size.dim]
    if pooling == "cls":
        return h[:, 0]
    m = batch["attention_mask"].unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def reference(arch, directory, batch, size, pooling):
    """Pool `last_hidden_state[:, :, :d]` of a plain HF forward pass of a model built with
    `num_hidden_layers = n` (its own config, the full model's weights), by hand."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(
        directory, config=config(arch, size.layers), attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"]  # the first n layers' weights, and everything else
    with torch.no_grad():
        return by_hand(model.eval()(**batch).last_hidden_state, batch, size, pooling)


@pytest.mark.parametrize("arch", CUT_ARCHS)
def test_every_size_equals_the_model_cut_to_its_layers(arch, tmp_path, tokenizer):
    base = saved_backbone(arch, tmp_path / "base", tokenizer)
    batch = tokenize(tokenizer, TEXTS, max_length=32)
    assert batch["attention_mask"].sum(1).unique().numel() == 3  # padded rows: the masks matter
    for pooling in ("cls", "mean"):
        enc, _, _ = load_encoder(str(base), pooling=pooling, normalize=False)
        enc.eval()
        with torch.no_grad():
            out = enc.embed(batch, SIZES)
        for size in SIZES:
            assert_near(out[size], reference(arch, base, batch, size, pooling))


@pytest.mark.parametrize("arch", CUT_ARCHS)
def test_without_a_final_norm_a_size_is_the_pooled_hidden_states(arch, tmp_path, tokenizer):
    """HF's `hidden_states[n]`: layer n's output (the last one: the model's output, after any final norm).
    Backbones without a final norm: a size is exactly that; with one, the final norm follows every layer."""
    from transformers import AutoModel

    base = saved_backbone(arch, tmp_path / "base", tokenizer)
    batch = tokenize(tokenizer, TEXTS, max_length=32)
    model = AutoModel.from_pretrained(base, attn_implementation="eager").eval()
    enc, _, _ = load_encoder(str(base), pooling="mean", normalize=False)
    assert (enc.final_norm is None) == (arch not in FINAL_NORM)
    if arch in FINAL_NORM:
        assert enc.final_norm is enc.backbone.get_submodule(FINAL_NORM[arch])
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
        out = enc.eval().embed(batch, SIZES)
        for size in SIZES:
            h = hidden[size.layers]
            if arch in FINAL_NORM and size.layers < 4:
                h = model.get_submodule(FINAL_NORM[arch])(h)
            assert_near(out[size], by_hand(h, batch, size, "mean"))


@pytest.mark.parametrize("arch", CUT_ARCHS)
def test_a_cut_model_saves_reloads_and_gives_the_full_models_size(arch, tmp_path, tokenizer):
    """`truncate_` (the separate baseline, SRL below the full depth, an export): the config follows
    (ModernBERT's `layer_types`), the cut model saves, reloads, and encodes each size as the full model does."""
    base = saved_backbone(arch, tmp_path / "base", tokenizer)
    batch = tokenize(tokenizer, TEXTS, max_length=32)
    full, _, _ = load_encoder(str(base), pooling="mean", normalize=False)
    full.eval()
    want = {}
    with torch.no_grad():
        for pooling in ("cls", "mean"):
            full.pooling = pooling
            want[pooling] = full.embed(batch, SIZES)
    for size in SIZES:
        cut = copy.deepcopy(full).truncate_(size.layers)
        assert cut.num_layers == size.layers and full.num_layers == 4
        save_encoder(cut, tmp_path / size.name, tokenizer, {"sizes": [size.to_dict()]})
        saved = json.loads((tmp_path / size.name / "config.json").read_text())
        assert saved.get("num_hidden_layers", saved.get("n_layers")) == size.layers
        if "layer_types" in saved:
            assert saved["layer_types"] == config(arch, size.layers).layer_types
        for pooling in ("cls", "mean"):
            again, _, _ = load_encoder(str(tmp_path / size.name), pooling=pooling, normalize=False)
            assert again.num_layers == size.layers
            with torch.no_grad():
                got = again.eval().embed(batch, [size])[size]
            assert_near(got, want[pooling][size])
            assert_near(got, reference(arch, base, batch, size, pooling))


def test_truncate_cuts_every_per_layer_config_list_and_nothing_else():
    from transformers import AutoModel

    enc = StarbucksEncoder(AutoModel.from_config(config("bert")))
    cfg = enc.config
    cfg.head_scales = [1.0, 2.0, 3.0, 4.0]  # any list as long as the layer list: one entry per layer
    cfg.layer_windows = (8, 16, 8, 16)
    cfg.eos_token_ids = [1, 2, 3, 4]  # token ids are not per layer
    cfg.architectures = ["A", "B", "C", "D"]
    cfg.stages = [1, 2]  # not as long as the layer list
    enc.truncate_(2)
    assert cfg.num_hidden_layers == 2 and enc.num_layers == 2
    assert cfg.head_scales == [1.0, 2.0] and cfg.layer_windows == (8, 16)
    assert cfg.eos_token_ids == [1, 2, 3, 4] and cfg.architectures == ["A", "B", "C", "D"] and cfg.stages == [1, 2]
    mb = StarbucksEncoder(AutoModel.from_config(config("modernbert"))).truncate_(3)
    assert mb.config.layer_types == config("modernbert", 3).layer_types
    mb.config.validate_layer_type()  # transformers' own check (what saving runs)


def test_a_modernbert_size_exports_and_reloads(tmp_path, tokenizer):
    """`train.export` of a size below the full depth of a ModernBERT checkpoint: it saves (the cut
    `layer_types`), reloads as a one-size checkpoint and gives the full model's vectors for that size."""
    from transformers import AutoModel

    from retrieval import StarbucksModel
    from train.export import export_size

    torch.manual_seed(0)
    sizes = [
        {"name": "small", "layers": 1, "dim": 8},
        {"name": "mid", "layers": 3, "dim": 16},
        {"name": "full", "layers": 4, "dim": 32},
    ]
    save_encoder(
        StarbucksEncoder(AutoModel.from_config(config("modernbert")), "mean", True),
        tmp_path / "model",
        tokenizer,
        {"sizes": sizes, "query_max_length": 8, "passage_max_length": 32},
    )
    model = StarbucksModel.from_pretrained(tmp_path / "model", "cpu")
    for name in ("small", "mid"):
        folder = export_size(model, name, tmp_path / name)
        again = StarbucksModel.from_pretrained(folder, "cpu")
        assert [s.name for s in again.sizes] == [name] and again.encoder.num_layers == model.size(name).layers
        assert_near(torch.from_numpy(again.encode(TEXTS)), torch.from_numpy(model.encode(TEXTS, name)))
        try:
            import sentence_transformers as st
        except ImportError:
            continue
        got = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
        assert_near(torch.from_numpy(got), torch.from_numpy(model.encode(TEXTS, name)))


@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_step_then_the_trained_model_encodes(arch, tmp_path, tokenizer):
    from train.finetune import run_training

    base = saved_backbone(arch, tmp_path / "base", tokenizer)
    batch = tokenize(tokenizer, TEXTS, max_length=32)
    corpus = tmp_path / "col"
    corpus.mkdir()
    (corpus / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS * 2))
    )
    (corpus / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "query_id": f"q{i}",
                    "query": TEXTS[i].split()[0],
                    "positive_document_ids": [f"d{i}"],
                    "negative_document_ids": [f"d{(i + 1) % 3}"],
                }
            )
            + "\n"
            for i in range(3)
        )
    )
    cfg = {
        "name": arch,
        "output_dir": str(tmp_path / "run"),
        "sizes": SIZES.to_config(),
        "model": {"name_or_path": str(base), "pooling": "mean", "query_max_length": 16, "passage_max_length": 32},
        "data": {"corpus": str(corpus), "train": str(corpus / "train.jsonl")},
        "train": {
            "batch_size": 3,
            "group_size": 2,
            "learning_rate": 1e-2,
            "max_steps": 1,
            "save_steps": 100,
            "logging_steps": 1,
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = run_training(load_config(tmp_path / "cfg.yaml"))
    assert result.steps == 1
    trained, _, meta = load_encoder(str(result.model_dir))
    assert meta["pooling"] == "mean"
    before, _, _ = load_encoder(str(base), pooling="mean")
    with torch.no_grad():
        new, old = trained.eval().embed(batch, SIZES), before.eval().embed(batch, SIZES)
    for size in SIZES:
        assert torch.isfinite(new[size]).all()
        assert not torch.allclose(new[size], old[size])  # the step changed every size's embedding


@pytest.mark.parametrize("arch", ARCHS)
def test_smae_where_the_masked_lm_head_is_supported(arch):
    from transformers import AutoModelForMaskedLM

    from train.smae import SMAE

    torch.manual_seed(0)
    mlm = AutoModelForMaskedLM.from_config(config(arch))
    sizes = SizeList([Size("s", 1, 8), Size("m", 2, 16), Size("full", 4, 32)])
    if arch not in MLM_HEAD_SUPPORTED:
        with pytest.raises(StarbucksError, match=type(mlm).__name__) as err:
            SMAE(mlm, sizes)
        assert "\n" not in str(err.value)
        return
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, VOCAB, (2, 10), generator=g)
    ids[:, 0] = 101
    attention = torch.ones_like(ids)
    attention[1, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 2] = ids[0, 3], ids[1, 2]
    masked = ids.clone()
    masked[0, 3] = masked[1, 2] = 103
    model = SMAE(mlm, sizes)
    out = model(
        {
            "input_ids": masked,
            "attention_mask": attention,
            "labels": labels,
            "decoder_input_ids": masked,
            "decoder_labels": labels,
        }
    )
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.encoder.layers.parameters())
    # the full-width head is the checkpoint's own head
    states = torch.randn(3, 32)
    with torch.no_grad():
        own = mlm.cls(states) if hasattr(mlm, "cls") else mlm.lm_head(states)
        torch.testing.assert_close(model.vocab_logits(states, 32), own)


def test_a_model_without_a_layer_list_is_one_clear_line():
    class Flat(torch.nn.Module):
        config = None

    with pytest.raises(StarbucksError, match="cannot find the transformer layer list of Flat") as err:
        StarbucksEncoder(Flat())
    assert "\n" not in str(err.value)


def test_early_exit_on_each_backbone_runs_only_the_needed_layers():
    from transformers import AutoModel

    for arch in ARCHS:
        enc = StarbucksEncoder(AutoModel.from_config(config(arch)).eval(), pooling="cls")
        calls = []
        for i, layer in enumerate(enc.layers):
            layer.register_forward_hook(lambda *_a, i=i: calls.append(i))
        ids = torch.randint(1000, VOCAB, (2, 6))
        with torch.no_grad():
            enc.embed({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [Size("s", 2, 8)])
        assert calls == [0, 1], arch
        assert enc.num_layers == 4
