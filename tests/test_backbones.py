"""Backbones beyond BERT: early exit, per-size pooling, a training step, encoding and SMAE for each
listed architecture (tiny random configs built here, MiniLM's tokenizer)."""

import json

import pytest
import torch
import yaml

from retrieval.config import load_config
from retrieval.errors import StarbucksError
from retrieval.modeling import StarbucksEncoder, load_encoder, resolve_model_path, tokenize
from retrieval.sizes import Size, SizeList

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
VOCAB = 30522  # MiniLM's (BERT's) tokenizer; pad 0, CLS 101, SEP 102
SIZES = SizeList([Size("a", 1, 8), Size("b", 2, 16), Size("c", 3, 24), Size("d", 4, 32)])
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=128, pad_token_id=0)
ARCHS = ["bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "modernbert"]
MLM_HEAD_SUPPORTED = {"bert", "roberta", "xlm-roberta", "mpnet"}
TEXTS = ["a daemon for zeroconf networking", "library", "the fast multithreaded preprocessor of a gtk runtime"]


def config(arch: str):
    import transformers as T

    if arch == "distilbert":  # its own names for the same shape
        return T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, hidden_dim=64,
                                  max_position_embeddings=128, pad_token_id=0)
    if arch == "electra":  # embeddings narrower than the layers (ELECTRA's projection)
        return T.ElectraConfig(**SHAPE, embedding_size=16)
    if arch == "modernbert":  # alternating global / sliding-window layers, rotary positions, a final norm
        return T.ModernBertConfig(**SHAPE, global_attn_every_n_layers=2, local_attention=4, bos_token_id=101,
                                  eos_token_id=102, cls_token_id=101, sep_token_id=102)
    classes = {"bert": T.BertConfig, "roberta": T.RobertaConfig, "xlm-roberta": T.XLMRobertaConfig,
               "mpnet": T.MPNetConfig}
    return classes[arch](**SHAPE)


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


def reference(directory, batch, size, pooling):
    """Pool `hidden_states[n][:, :d]` of a plain HF forward pass of the full model, by hand."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        h = model(**batch, output_hidden_states=True).hidden_states[size.layers][..., : size.dim]
    if pooling == "cls":
        return h[:, 0]
    m = batch["attention_mask"].unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_size_equals_pooled_hidden_states(arch, tmp_path, tokenizer):
    base = saved_backbone(arch, tmp_path / "base", tokenizer)
    batch = tokenize(tokenizer, TEXTS, max_length=32)
    assert batch["attention_mask"].sum(1).unique().numel() == 3  # padded rows: the masks matter
    for pooling in ("cls", "mean"):
        enc, _, _ = load_encoder(str(base), pooling=pooling, normalize=False)
        enc.eval()
        with torch.no_grad():
            out = enc.embed(batch, SIZES)
        for size in SIZES:
            torch.testing.assert_close(out[size], reference(base, batch, size, pooling), rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_step_then_the_trained_model_encodes(arch, tmp_path, tokenizer):
    from train.finetune import run_training

    base = saved_backbone(arch, tmp_path / "base", tokenizer)
    batch = tokenize(tokenizer, TEXTS, max_length=32)
    corpus = tmp_path / "col"
    corpus.mkdir()
    (corpus / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                                 for i, t in enumerate(TEXTS * 2)))
    (corpus / "train.jsonl").write_text("".join(
        json.dumps({"query_id": f"q{i}", "query": TEXTS[i].split()[0], "positive_document_ids": [f"d{i}"],
                    "negative_document_ids": [f"d{(i + 1) % 3}"]}) + "\n" for i in range(3)))
    cfg = {"name": arch, "output_dir": str(tmp_path / "run"), "sizes": SIZES.to_config(),
           "model": {"name_or_path": str(base), "pooling": "mean", "query_max_length": 16, "passage_max_length": 32},
           "data": {"corpus": str(corpus), "train": str(corpus / "train.jsonl")},
           "train": {"batch_size": 3, "group_size": 2, "learning_rate": 1e-2, "max_steps": 1, "save_steps": 100,
                     "logging_steps": 1}}
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
    out = model({"input_ids": masked, "attention_mask": attention, "labels": labels,
                 "decoder_input_ids": masked, "decoder_labels": labels})
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
