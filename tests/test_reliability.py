"""Bad input and damaged artifacts (issue 13): one line and exit code 2, nothing finished lost, and never
an artifact that a later run trusts wrongly. Each case runs the stage's command-line entry as a user would."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import shutil
import time

import numpy as np
import pytest

from conftest import mini_slice, save_tiny_backbone
from retrieval.config import load_config
from retrieval.data import iter_corpus, load_corpus
from retrieval.errors import StarbucksError
from retrieval.lock import run_lock
from retrieval.store import EmbeddingStore

QUERIES, PASSAGES = 12, 40


def stage(name: str, config, *overrides: str) -> None:
    module = __import__(f"{name}.__main__", fromlist=["main"])
    module.main(["--config", str(config), *overrides])


def fails(capsys, name: str, config, *overrides: str) -> str:
    """Run a stage that must refuse: exit code 2 and one line on stderr (returned)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        stage(name, config, *overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def write_corpus(col, rows) -> None:
    with gzip.open(col / "corpus.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"_id": d, "text": t}) + "\n" for d, t in rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A slice of debian-pkgs-mini, a tiny "trained" model, and a config for the four stages."""
    root = tmp_path_factory.mktemp("reliability")
    col, qids, dev = mini_slice(root / "col", queries=QUERIES, passages=PASSAGES)
    save_tiny_backbone(root / "model", layers=2, hidden=16)
    config = root / "exp.yaml"
    config.write_text(f"""
name: rel
model: {{name_or_path: {root / "model"}, pooling: cls, normalize: false, query_max_length: 16, passage_max_length: 32}}
sizes: ["1x8", "2x16"]
data: {{corpus: {col}, eval_splits: {{dev: {col}}}}}
encode: {{model: {root / "model"}, batch_size: 16, shard_rows: 16}}
search: {{depth: 10}}
eval: {{metrics: [RR@10], plot: false}}
""")
    return root, col, config


def run_dir(tmp_path, name="exp"):
    return [f"output_dir={tmp_path / name}"]


def all_stages(config, *overrides):
    for name in ("encode", "search", "eval"):
        stage(name, config, *overrides)


# ---------------------------------------------------------------- silent wrong results


def test_qrels_of_another_collection_are_refused_and_missing_passages_counted(setup, tmp_path, capsys):
    root, col, config = setup
    corpus = list(iter_corpus(str(col)))
    qrels = [line.split("\t") for line in (col / "qrels" / "dev.tsv").read_text().splitlines()[1:]]
    positives = {d for _, d, _ in qrels}
    dropped = sorted(positives)[:5]

    sliced = tmp_path / "sliced"
    sliced.mkdir()
    write_corpus(sliced, [(d, t) for d, t in corpus if d not in dropped])
    out = run_dir(tmp_path, "sliced-run")
    stage("encode", config, f"data.corpus={sliced}", *out)
    capsys.readouterr()
    stage("search", config, f"data.corpus={sliced}", *out)
    assert f"5 of its {len(positives)} relevant passages are not in the corpus" in capsys.readouterr().err
    stage("eval", config, f"data.corpus={sliced}", *out)
    assert f"5 of its {len(positives)} relevant passages are not in the corpus" in capsys.readouterr().err
    report = json.loads((tmp_path / "sliced-run" / "eval" / "dev.json").read_text())
    assert report["qrels_coverage"]["missing"] == 5 and report["qrels_coverage"]["relevant"] == len(positives)
    assert all(s["relevant_missing"] == 5 for s in report["sizes"])

    other = tmp_path / "other"
    other.mkdir()
    write_corpus(other, [(d, t) for d, t in corpus if d not in positives])
    out = run_dir(tmp_path, "other-run")
    stage("encode", config, f"data.corpus={other}", *out)
    line = fails(capsys, "search", config, f"data.corpus={other}", *out)
    assert f"none of its {len(positives)} relevant passages is in the corpus" in line and "data.eval_splits.dev" in line
    assert not (tmp_path / "other-run" / "runs").exists()


def test_an_empty_corpus_and_duplicate_ids_are_refused(setup, tmp_path, capsys):
    root, col, config = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    write_corpus(empty, [])
    line = fails(capsys, "encode", config, f"data.corpus={empty}", *run_dir(tmp_path))
    assert "holds no passages" in line

    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"}\n\n{"_id": "a", "text": "z"}\n')
    with pytest.raises(StarbucksError, match=r"dup.jsonl line 4: passage id 'a' appears a second time"):
        load_corpus(str(dup))
    line = fails(capsys, "encode", config, f"data.corpus={dup}", *run_dir(tmp_path, "dup-run"))
    assert "line 4: passage id 'a' appears a second time" in line


def test_a_damaged_run_file_is_searched_again_and_refused_by_eval(setup, tmp_path, capsys):
    root, col, config = setup
    out = run_dir(tmp_path)
    stage("encode", config, *out)
    stage("search", config, *out)
    run = tmp_path / "exp" / "runs" / "dev" / "2x16.trec"
    whole = run.read_text()
    first_query = [line for line in whole.splitlines(True) if line.split()[0] == whole.split()[0]]
    run.write_text("".join(first_query))  # cut at a line boundary: 1 of 12 queries left

    line = fails(capsys, "eval", config, *out)
    assert "2x16.trec is not the file search wrote" in line and f"1 queries / {len(first_query)} lines" in line
    stage("search", config, *out)
    assert "is not the file written" in capsys.readouterr().err
    assert run.read_text() == whole
    stage("eval", config, *out)

    # a run without a record (made elsewhere) that ranks fewer queries than the split has: a warning
    run.with_suffix(".json").unlink()
    run.write_text("".join(first_query))
    capsys.readouterr()
    stage("eval", config, *out)
    assert f"ranks passages for 1 of the {QUERIES} judged queries" in capsys.readouterr().err
    assert json.loads((tmp_path / "exp" / "eval" / "dev.json").read_text())["sizes"][1]["run_queries"] == 1


def test_encode_without_a_trained_model_stops_and_writes_nothing(setup, tmp_path, capsys):
    root, col, config = setup
    line = fails(capsys, "encode", config, "encode.model=null", *run_dir(tmp_path))
    assert f"no trained model in {tmp_path / 'exp' / 'model'}" in line and "python -m train" in line
    assert f"encode.model={root / 'model'}" in line
    assert not (tmp_path / "exp" / "embeddings").exists() or not any((tmp_path / "exp" / "embeddings").iterdir())


def test_an_edited_passage_re_encodes_its_shard_only(setup, tmp_path, capsys):
    root, col, config = setup
    own = tmp_path / "col"
    shutil.copytree(col, own)
    out = [f"data.corpus={own}", *run_dir(tmp_path)]
    stage("encode", config, *out)
    stage("search", config, *out)
    store = EmbeddingStore(tmp_path / "exp" / "embeddings" / "2x16")
    before = {k: store.shard_path(k).stat().st_mtime_ns for k in range(3)}
    old_vectors = np.array(store.load_shard(1))
    old_texts = store.read_meta()["texts_sha256"]

    corpus = list(iter_corpus(str(own)))
    edited = corpus[20][0]  # row 20: shard 1 of 16-row shards
    corpus[20] = (edited, "a completely different description of another package")
    write_corpus(own, corpus)
    time.sleep(0.01)
    capsys.readouterr()
    stage("encode", config, *out)
    assert "shard-00001.npy is made from other passage texts; encoding it again" in capsys.readouterr().err
    after = {k: store.shard_path(k).stat().st_mtime_ns for k in range(3)}
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    new_vectors = np.array(store.load_shard(1))
    assert not np.array_equal(new_vectors[20 - 16], old_vectors[20 - 16])
    np.testing.assert_array_equal(np.delete(new_vectors, 4, axis=0), np.delete(old_vectors, 4, axis=0))
    assert store.read_meta()["texts_sha256"] != old_texts
    stage("search", config, *out)
    assert "2x16.trec is up to date" not in capsys.readouterr().err


def test_a_truncated_shard_is_refused_by_search_and_repaired_by_encode(setup, tmp_path, capsys):
    root, col, config = setup
    out = run_dir(tmp_path)
    stage("encode", config, *out)
    shard = tmp_path / "exp" / "embeddings" / "2x16" / "shard-00001.npy"
    whole = shard.read_bytes()
    with open(shard, "r+b") as f:
        f.truncate(200)
    line = fails(capsys, "search", config, *out)
    assert str(shard) in line and "damaged" in line and "re-run `python -m encode`" in line
    stage("encode", config, *out)
    assert "shard-00001.npy is damaged; encoding it again" in capsys.readouterr().err
    assert shard.read_bytes() == whole


def test_a_corpus_with_a_byte_that_is_not_utf8_names_file_line_and_offset(setup, tmp_path, capsys):
    root, col, config = setup
    bad = tmp_path / "bad.jsonl"
    first = b'{"_id": "a", "text": "fine"}\n'
    bad.write_bytes(first + b'{"_id": "b", "text": "caf\xe9"}\n')
    line = fails(capsys, "encode", config, f"data.corpus={bad}", *run_dir(tmp_path))
    offset = len(first) + len(b'{"_id": "b", "text": "caf')
    assert f"bad.jsonl line 2: byte 0xe9 at byte offset {offset} is not UTF-8" in line


# ---------------------------------------------------------------- one line instead of a traceback


@pytest.mark.parametrize(
    "name, override, words",
    [
        ("train", "train.learning_rate=abc", "train.learning_rate = 'abc' is not a number"),
        ("train", "train.temperature=warm", "train.temperature = 'warm' is not a number"),
        ("train", "train.warmup_ratio=lots", "train.warmup_ratio = 'lots' is not a number"),
        ("train", "train.batch_size=2.5", "train.batch_size = 2.5 must be a whole number >= 1"),
        ("encode", "encode.batch_size=many", "encode.batch_size = 'many' must be a whole number >= 1"),
        ("search", "search.depth=deep", "search.depth = 'deep' must be a whole number >= 1"),
        ("encode", "encode.sizes=0x32", "size 0x32 is invalid"),
        (
            "encode",
            "sizes=[2x16,1x8]",
            "sizes must be ordered small to large (layers and dims increasing): 1x8 comes after 2x16",
        ),
        (
            "encode",
            "encode.dataloader_workers=-1",
            "encode.dataloader_workers = -1 must be auto or a whole number >= 0",
        ),
    ],
)
def test_bad_values_are_one_line(setup, tmp_path, capsys, name, override, words):
    root, col, config = setup
    assert words in fails(capsys, name, config, override, *run_dir(tmp_path))


def test_size_names_stay_text_and_null_removes_an_inherited_split(setup):
    root, col, config = setup
    cfg = load_config(config, ["encode.sizes=0x32", "search.sizes=1x8,2x16", "data.eval_splits.dev=null"])
    assert cfg.encode.sizes == "0x32" and cfg.search.sizes == "1x8,2x16"
    assert dict(cfg.data.eval_splits) == {}
    cfg = load_config(None, ["data.eval_splits.dev=null"])
    assert list(cfg.data.eval_splits) == ["test"]
    assert load_config(None, ["train.learning_rate=1e-4", "train.epochs=2"]).train.epochs == 2.0


def _hold(directory, started, release):
    with run_lock(directory, "training test", ".lock-train"):
        started.set()
        release.wait(30)


def test_a_second_training_of_the_same_run_stops_and_a_killed_holder_leaves_no_lock(setup, tmp_path, capsys):
    root, col, config = setup
    ctx = multiprocessing.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path / "exp", started, release))
    holder.start()
    assert started.wait(30)
    line = fails(
        capsys,
        "train",
        config,
        f"data.train={col / 'train.jsonl'}",
        "train.batch_size=2",
        "train.group_size=2",
        "train.max_steps=1",
        *run_dir(tmp_path),
    )
    assert f"{tmp_path / 'exp'} is in use by training test (pid {holder.pid}" in line
    os.kill(holder.pid, 9)  # kill -9: no clean-up runs, the lock file stays behind
    holder.join()
    assert (tmp_path / "exp" / ".lock-train").exists()
    with run_lock(tmp_path / "exp", "second", ".lock-train"):  # the stale file is no obstacle
        pass
    assert not (tmp_path / "exp" / ".lock-train").exists()


def test_the_encode_lock_is_per_slice(tmp_path):
    with run_lock(tmp_path, "encode 0/2", ".lock-encode-0of2"):
        with run_lock(tmp_path, "encode 1/2", ".lock-encode-1of2"):
            pass
        with pytest.raises(StarbucksError, match="is in use by encode 0/2"):
            with run_lock(tmp_path, "encode 0/2 again", ".lock-encode-0of2"):
                pass


def test_query_embeddings_older_than_the_passages_name_the_fix(setup, tmp_path):
    root, col, config = setup
    out = run_dir(tmp_path)
    stage("encode", config, *out)
    store = EmbeddingStore(tmp_path / "exp" / "embeddings" / "2x16")
    qmeta_path = store.queries_path("dev").with_suffix(".json")
    qmeta = json.loads(qmeta_path.read_text())
    qmeta_path.write_text(json.dumps({**qmeta, "model_sha256": "an-older-model"}))
    past = time.time() - 3600
    os.utime(qmeta_path, (past, past))
    with pytest.raises(
        StarbucksError,
        match=r"model_sha256 is 'an-older-model' for the queries but .* for the passages; "
        r"the queries are older: re-run `python -m encode`",
    ):
        store.load_queries("dev")
    stage("encode", config, *out)  # following the advice repairs it
    assert store.load_queries("dev")[2]["model_sha256"] == store.read_meta()["model_sha256"]


# ---------------------------------------------------------------- faults of the machine (issue 29)


def tree_bytes(directory, pattern="*"):
    """`{relative path: bytes}` of the files under `directory` matching `pattern`."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob(pattern)) if p.is_file()}


def no_temporary_files(directory) -> bool:
    return not [p for p in directory.rglob(".tmp-*")]


def full_disk_at(monkeypatch, kind: str, name: str):
    """Make the write of the file called `name` fail as on a full disk: numpy's short write (no errno)
    or a text write's OSError(ENOSPC) (no file name)."""
    import errno
    import pathlib

    if kind == "numpy":
        real = np.save

        def save(f, array, *args, **kwargs):
            if f"{name}." in getattr(f, "name", ""):
                raise OSError(f"{array.nbytes} requested and 0 written")
            return real(f, array, *args, **kwargs)

        monkeypatch.setattr(np, "save", save)
    else:
        real_text = pathlib.Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name.startswith(f".tmp-{name}."):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_text(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)


@pytest.mark.parametrize("kind, name", [("numpy", "shard-00001.npy"), ("text", "ids-00002.txt")])
def test_a_full_disk_stops_encode_with_one_line_and_a_rerun_finishes_the_same_embeddings(
    setup, tmp_path, capsys, monkeypatch, kind, name
):
    root, col, config = setup
    stage("encode", config, *run_dir(tmp_path, "whole"))
    stage("search", config, *run_dir(tmp_path, "whole"))
    whole = tmp_path / "whole"

    out = run_dir(tmp_path)
    embeddings = tmp_path / "exp" / "embeddings"
    with monkeypatch.context() as patch:
        full_disk_at(patch, kind, name)
        line = fails(capsys, "encode", config, *out)
    assert f"no space left on the device for {embeddings / '1x8' / name}; free space" in line
    assert "re-run the same command: finished work is kept and the run resumes" in line
    assert no_temporary_files(embeddings)
    first = embeddings / "2x16" / "shard-00000.npy"
    assert first.read_bytes() == (whole / "embeddings" / "2x16" / "shard-00000.npy").read_bytes()
    finished = first.stat().st_mtime_ns

    stage("encode", config, *out)  # space freed: the run resumes
    assert first.stat().st_mtime_ns == finished  # what was finished is not encoded again
    for pattern in ("*.npy", "*.txt"):
        assert tree_bytes(embeddings, pattern) == tree_bytes(whole / "embeddings", pattern)
    stage("search", config, *out)
    assert tree_bytes(tmp_path / "exp" / "runs", "*.trec") == tree_bytes(whole / "runs", "*.trec")


def read_only_at(monkeypatch, place, code):
    """Make directories under `place` fail to be made as on a read-only file system (or without permission)."""
    import pathlib

    real = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(place)):
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


@pytest.mark.parametrize(
    "name, key, words",
    [
        (
            "encode",
            "output_dir",
            "is on a read-only file system; choose another output_dir (or paths.*) in a writable place",
        ),
        (
            "search",
            "paths.runs",
            "is on a read-only file system; choose another output_dir (or paths.*) in a writable place",
        ),
        ("eval", "paths.eval", "no permission to use"),
        ("train", "output_dir", "is on a read-only file system"),
    ],
)
def test_a_read_only_output_place_is_one_line(setup, tmp_path, capsys, monkeypatch, name, key, words):
    import errno

    root, col, config = setup
    out = run_dir(tmp_path)
    if name in ("search", "eval"):
        stage("encode", config, *out)
        stage("search", config, *out)
    place = tmp_path / "read-only"
    read_only_at(monkeypatch, place, errno.EACCES if name == "eval" else errno.EROFS)
    overrides = (
        [f"data.train={col / 'train.jsonl'}", "train.batch_size=2", "train.group_size=2", "train.max_steps=1"]
        if name == "train"
        else []
    )
    line = fails(capsys, name, config, *out, *overrides, f"{key}={place / 'exp'}")
    assert f"{place / 'exp'}" in line and words in line


TRAIN = [
    "train.batch_size=2",
    "train.group_size=2",
    "train.max_steps=3",
    "train.save_steps=1",
    "train.save_total_limit=0",
]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_training_resumes_to_the_same_model(
    setup, tmp_path, capsys, monkeypatch
):
    import torch

    import train.checkpoint

    root, col, config = setup
    data = f"data.train={col / 'train.jsonl'}"
    stage("train", config, data, *TRAIN, *run_dir(tmp_path, "whole"))

    real = torch.save

    def save(obj, f, *args, **kwargs):  # what torch 2.x says when the disk fills under torch.save
        if "checkpoint-2" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, f, *args, **kwargs)

    out = run_dir(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        patch.setattr(train.checkpoint, "_free_bytes", lambda path: 0)
        line = fails(capsys, "train", config, data, *TRAIN, *out)
    checkpoints = tmp_path / "exp" / "checkpoints"
    assert f"no space left on the device for {checkpoints / '.tmp-checkpoint-2'}; free space" in line
    assert (checkpoints / "checkpoint-1" / "trainer_state.json").is_file()  # the finished checkpoint stays
    assert not (checkpoints / "checkpoint-2").exists()

    stage("train", config, data, *TRAIN, *out)
    assert "resumed at 1" in capsys.readouterr().out
    assert (tmp_path / "exp" / "model" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model" / "model.safetensors"
    ).read_bytes()


def test_write_failures_of_torch_and_safetensors_name_the_checkpoint(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    from train.checkpoint import saving

    with pytest.raises(OSError) as info, saving(tmp_path / "ckpt"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "ckpt")
    with pytest.raises(OSError) as info, saving(tmp_path / "ckpt"):  # space left: not a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
    assert info.value.errno == errno.EIO
    with pytest.raises(RuntimeError, match="a bug"), saving(tmp_path / "ckpt"):
        raise RuntimeError("a bug")  # not a write failure: as it is
    with pytest.raises(OSError) as info, saving(tmp_path / "ckpt"):
        raise OSError(errno.ENOSPC, "No space left on device")  # a write that names no file
    assert info.value.filename == str(tmp_path / "ckpt")


def test_a_damaged_model_file_is_named(setup, tmp_path, capsys):
    root, col, config = setup
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    for cut in (100, len(whole) // 2):
        weights.write_bytes(whole[:cut])
        line = fails(capsys, "encode", config, f"encode.model={model}", *run_dir(tmp_path))
        assert f"{weights} is damaged (" in line and "re-download the model or train it again" in line
    assert not any((tmp_path / "exp" / "embeddings").rglob("*.npy"))
    line = fails(
        capsys,
        "train",
        config,
        f"model.name_or_path={model}",
        f"data.train={col / 'train.jsonl'}",
        "train.batch_size=2",
        "train.group_size=2",
        "train.max_steps=1",
        *run_dir(tmp_path),
    )
    assert f"{weights} is damaged (" in line


# ---------------------------------------------------------------- inputs keyed by id (issue 29)


def own_collection(col, tmp_path):
    own = tmp_path / "col"
    shutil.copytree(col, own)
    return own


def test_a_repeated_query_id_is_refused(setup, tmp_path, capsys):
    root, col, config = setup
    own = own_collection(col, tmp_path)
    first = json.loads((own / "queries.jsonl").read_text().splitlines()[0])["_id"]
    with open(own / "queries.jsonl", "a") as f:
        f.write(json.dumps({"_id": first, "text": "another text under the same id"}) + "\n")
    where = f"{own / 'queries.jsonl'} line {QUERIES + 1}: query id {first!r} appears a second time (first at line 1)"
    out = run_dir(tmp_path)
    stage("encode", config, *out)
    stage("search", config, *out)
    for name in ("encode", "search", "eval"):
        assert where in fails(capsys, name, config, f"data.eval_splits.dev={own}", *out)

    topics = tmp_path / "topics.tsv"
    topics.write_text("q1\tfirst\nq2\tsecond\nq1\tthird\n")
    from retrieval.data import read_queries_file

    with pytest.raises(
        StarbucksError, match=r"topics.tsv line 3: query id 'q1' appears a second time \(first at line 1\)"
    ):
        read_queries_file(topics)


def test_qrels_judging_a_pair_twice_are_refused_with_other_grades_and_kept_once_with_the_same(
    setup, tmp_path, capsys, caplog
):
    from retrieval.data import load_split

    root, col, config = setup
    own = own_collection(col, tmp_path)
    qrels = own / "qrels" / "dev.tsv"
    text = qrels.read_text()
    qid, did, _ = text.splitlines()[1].split("\t")
    qrels.write_text(text + f"{qid}\t{did}\t2\n")
    line = fails(capsys, "encode", config, f"data.eval_splits.dev={own}", *run_dir(tmp_path))
    assert f"{qrels} line {QUERIES + 2}: query {qid!r} judges passage {did!r} 2, but line 2 judged it 1" in line

    qrels.write_text(text + f"{qid}\t{did}\t1\n" + text.splitlines(True)[3])
    with caplog.at_level("WARNING", logger="retrieval.data"):
        split = load_split("dev", str(own))
    assert (
        f"{qrels}: 2 judgment(s) repeat an earlier one with the same grade (first: line {QUERIES + 2} repeats line 2)"
        in caplog.text
    )
    assert split.qrels == load_split("dev", str(col)).qrels


def test_a_second_training_group_for_a_query_id_is_refused(setup, tmp_path, capsys):
    from retrieval.data import load_train_groups

    root, col, config = setup
    groups = tmp_path / "train.jsonl"
    lines = (col / "train.jsonl").read_text().splitlines(True)
    groups.write_text("".join(lines) + lines[0])
    qid = json.loads(lines[0])["query_id"]
    where = f"{groups} line {len(lines) + 1}: query id {qid!r} has a second training group (first at line 1)"
    line = fails(
        capsys,
        "train",
        config,
        f"data.train={groups}",
        "train.batch_size=2",
        "train.group_size=2",
        "train.max_steps=1",
        *run_dir(tmp_path),
    )
    assert where in line
    assert len(load_train_groups(str(col / "train.jsonl"), str(col))) == len(lines)


def test_a_run_file_ranking_a_passage_twice_for_a_query_is_refused(tmp_path):
    from retrieval.runfile import read_run

    run = tmp_path / "1x8.trec"
    run.write_text("q1 Q0 d1 1 2.0 t\nq1 Q0 d2 2 1.0 t\nq2 Q0 d1 1 1.0 t\nq1 Q0 d1 3 0.5 t\n")
    with pytest.raises(StarbucksError, match=r"1x8.trec line 4: query 'q1' ranks passage 'd1' a second time"):
        read_run(run)


SIGTERM_AT = """
import os, signal, sys
import retrieval.io, retrieval.store
from train.checkpoint import Checkpoints

real_npy, real_commit = retrieval.store._write_npy, Checkpoints.commit


def write_npy(path, array):  # SIGTERM half-way through writing shard 2
    if path.name == "shard-00002.npy":
        with retrieval.io.atomic_path(path) as tmp:
            tmp.write_bytes(b"\\x93NUMPY" + bytes(40))
            os.kill(os.getpid(), signal.SIGTERM)
    real_npy(path, array)


def commit(self, staging, step):  # SIGTERM right after checkpoint 2
    final = real_commit(self, staging, step)
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return final


retrieval.store._write_npy, Checkpoints.commit = write_npy, commit
__import__(sys.argv[1] + ".__main__", fromlist=["main"]).main(sys.argv[2:])
"""


def terminated(name: str, config, *overrides: str) -> None:
    """Run a stage in a process that gets SIGTERM (default action: it ends at once, no clean-up runs)."""
    import signal
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT, name, "--config", str(config), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]


def test_sigterm_mid_encode_and_mid_training_loses_nothing_and_a_rerun_ends_the_same(setup, tmp_path, capsys):
    root, col, config = setup
    whole, out = run_dir(tmp_path, "whole"), run_dir(tmp_path)
    train_args = [f"data.train={col / 'train.jsonl'}", *TRAIN]
    stage("encode", config, *whole)
    stage("train", config, *train_args, *whole)

    terminated("encode", config, *out)
    embeddings = tmp_path / "exp" / "embeddings"
    assert not (embeddings / "1x8" / "shard-00002.npy").exists() and (embeddings / "1x8" / "shard-00001.npy").exists()
    stage("encode", config, *out)
    for pattern in ("*.npy", "*.txt"):
        assert tree_bytes(embeddings, pattern) == tree_bytes(tmp_path / "whole" / "embeddings", pattern)

    terminated("train", config, *train_args, *out)
    assert (tmp_path / "exp" / "checkpoints" / "checkpoint-2").is_dir() and not (tmp_path / "exp" / "model").exists()
    stage("train", config, *train_args, *out)
    assert "resumed at 2" in capsys.readouterr().out
    assert (tmp_path / "exp" / "model" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model" / "model.safetensors"
    ).read_bytes()
