"""`pretrain prepare`: shard format, determinism, tokenizers, crash safety and every bad-input path.

Exit-code / no-traceback behaviour is tested through the real CLI in a subprocess; everything else calls
`prepare()` directly on tiny corpora built here.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from framework.data.prepare import default_corpus, is_val, make_key, parse_size, prepare, verify
from framework.data.tokenizer import SPECIAL_TOKENS, build_tokenizer, load_tokenizer
from framework.errors import UserError

REPO = Path(__file__).resolve().parents[1]

TEXTS = {
    "a.txt": "Hello, world!\nThis is document A.\n",
    "b.md": "# Title\n\nUnicode: héllo wörld, 日本語, emoji 🚀, and a literal <|endoftext|> in the text.\r\n",
    "code/c.py": "def f(x):\n    return x * 2  # comment\n" * 20,
    "code/deeper/d.rst": "Some *rst* text.\n" * 50,
    "e.txt": "tab\tand\x01control bytes\x7f\n",
}


def write_corpus(root: Path, texts: dict[str, str] = TEXTS) -> Path:
    for name, text in texts.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("utf-8"))
    return root


def read_tars(out: Path, split: str) -> list[tuple[str, np.ndarray]]:
    """(member name, token ids) of every document of a split, in shard order."""
    manifest = json.loads((out / "manifest.json").read_text())
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            for m in tf:
                dtype = {"u16": "<u2", "u32": "<u4"}[m.name.rsplit(".", 1)[1]]
                docs.append((m.name, np.frombuffer(tf.extractfile(m).read(), dtype=dtype)))
    return docs


def all_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framework", "prepare", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, exactly one `error:` line naming the problem, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


# ------------------------------------------------------------------------------------------------ tokenizer

def test_bytes_fast_path_equals_hf_encoding():
    tok, spec = build_tokenizer("bytes")
    assert spec == "bytes" and tok.is_bytes
    assert tok.vocab_size == 261 and tok.dtype == np.uint16
    assert tok.special_ids == {"eod": 256, "pad": 257, "mask": 258, "cls": 259, "sep": 260}
    samples = [*TEXTS.values(), "", " ", "<|endoftext|>", "x<|pad|>y<|sep|>", "\x00\r\n\t", "ÿ\u0100\uffff𝕏",
               "".join(map(chr, range(1, 1000)))]
    for text in samples:
        ids = tok.encode(text)
        assert ids == tok.encode_hf(text) == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode([104, 105, 256]) == "hi<|endoftext|>"


def test_tokenizer_json_round_trips(tmp_path):
    prepare([str(write_corpus(tmp_path / "c"))], tmp_path / "o", progress=False)
    tok = load_tokenizer(tmp_path / "o" / "tokenizer.json")
    assert tok.is_bytes and tok.vocab_size == 261 and tok.special_ids["eod"] == 256
    assert tok.encode("<|endoftext|>") == list(b"<|endoftext|>")  # specials never come from text


def test_bpe_is_deterministic_and_keeps_specials_out_of_text(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    m1 = prepare([str(corpus)], tmp_path / "o1", tokenizer="bpe:300", val_fraction=0.2, progress=False)
    prepare([str(corpus)], tmp_path / "o2", tokenizer="bpe:300", val_fraction=0.2, workers=2, progress=False)
    assert all_files(tmp_path / "o1") == all_files(tmp_path / "o2")
    assert m1["tokenizer"]["spec"] == "bpe:300" and m1["tokenizer"]["vocab_size"] == 300
    tok = load_tokenizer(tmp_path / "o1" / "tokenizer.json")
    assert not tok.is_bytes
    assert set(tok.special_ids) == set(SPECIAL_TOKENS) and m1["tokenizer"]["special_tokens"] == tok.special_ids
    text = TEXTS["b.md"]
    assert tok.special_ids["eod"] not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    docs = read_tars(tmp_path / "o1", "train") + read_tars(tmp_path / "o1", "val")
    assert sorted(tok.decode(ids) for _, ids in docs) == sorted(TEXTS.values())


def test_bpe_vocab_must_fit_bytes_and_specials(tmp_path):
    with pytest.raises(UserError, match="at least 261"):
        prepare([str(write_corpus(tmp_path / "c"))], tmp_path / "o", tokenizer="bpe:260", progress=False)
    assert not (tmp_path / "o").exists()


def test_existing_tokenizer_file_gets_the_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(70_000)}}  # > 65536 ids: shards must be uint32
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "words.json"))
    write_corpus(tmp_path / "c", {"x.txt": "w1 w69999 nope <|endoftext|>"})
    m = prepare([str(tmp_path / "c")], tmp_path / "o", tokenizer=str(tmp_path / "words.json"), val_fraction=0,
                progress=False)
    assert m["tokenizer"]["spec"] == "file:words.json" and m["dtype"] == "uint32"
    assert m["tokenizer"]["vocab_size"] == 70_001 + len(SPECIAL_TOKENS)
    tok = load_tokenizer(tmp_path / "o" / "tokenizer.json")
    assert tok.special_ids["eod"] == 70_001
    [(name, ids)] = read_tars(tmp_path / "o", "train")
    assert name.endswith(".u32")
    assert ids[:2].tolist() == [2, 70_000] and tok.special_ids["eod"] not in ids.tolist()


# ------------------------------------------------------------------------------------------------ format

def test_shards_decode_to_the_documents_and_counts_match(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    m = prepare([str(corpus)], tmp_path / "o", val_fraction=0.3, shard_size=200, progress=False)
    out = tmp_path / "o"
    decoded = {}
    for split in ("train", "val"):
        entry = m["splits"][split]
        docs = read_tars(out, split)
        assert entry["samples"] == len(docs) == sum(s["samples"] for s in entry["shards"])
        assert entry["tokens"] == sum(len(ids) for _, ids in docs) == sum(s["tokens"] for s in entry["shards"])
        for shard in entry["shards"]:
            assert (out / shard["name"]).stat().st_size == shard["bytes"]
            with tarfile.open(out / shard["name"]) as tf:
                for info in tf:
                    assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == \
                           (0, 0, 0, "", "", 0o644)
                    assert info.size == len(tf.extractfile(info).read()) and info.size > 0
        for name, ids in docs:
            key, ext = name.split(".")  # exactly one dot: the extension
            assert ext == "u16" and "/" not in key and len(name) < 100
            decoded[key] = bytes(ids.astype(np.uint8)).decode("utf-8")  # bytes tokenizer: id == byte
    assert sorted(decoded.values()) == sorted(TEXTS.values())
    keys = sorted(decoded)  # global index first: key order is the sorted-input order
    assert [k[:9] for k in keys] == [f"{i:09d}" for i in range(len(TEXTS))]
    assert keys[0].endswith("_a_txt") and any(k.endswith("_code_deeper_d_rst") for k in keys)
    assert len(m["splits"]["train"]["shards"]) > 1  # 200-byte shards: several
    assert m["sources"] == {"inputs": [str(corpus)], "files": 5, "documents": 5, "skipped_binary": 0,
                            "skipped_empty": 0, "bytes": sum(len(t.encode()) for t in TEXTS.values())}
    assert not list(out.glob("*.tmp"))


def test_gzip_and_jsonl_inputs(tmp_path):
    c = tmp_path / "c"
    c.mkdir()
    lines = [json.dumps({"text": "first é"}), "", json.dumps({"text": "", "id": 3}), json.dumps({"text": "third"})]
    (c / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (c / "more.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": "zipped line"}) + "\n").encode()))
    (c / "plain.txt.gz").write_bytes(gzip.compress(b"zipped file\n"))
    m = prepare([str(c)], tmp_path / "o", val_fraction=0, progress=False)
    docs = {name.split(".")[0]: bytes(ids.astype(np.uint8)).decode()
            for name, ids in read_tars(tmp_path / "o", "train")}
    assert docs == {"000000000_docs_jsonl_1": "first é", "000000001_docs_jsonl_4": "third",
                    "000000002_more_jsonl_gz_1": "zipped line", "000000003_plain_txt_gz": "zipped file\n"}
    assert m["sources"]["skipped_empty"] == 1 and m["sources"]["files"] == 3


def test_make_key_and_shard_size():
    key = make_key(12, "a/" * 80 + "file.name.txt", 7)
    assert len(key + ".u16") < 100 and key.startswith("000000012_") and key.endswith("file_name_txt_7")
    assert make_key(0, "x y/ü.md", 0) == "000000000_x_y___md"
    assert [parse_size(s) for s in ("64MB", "1GB", "500KB", "4096", "1.5k", "2MiB", 7)] == \
           [64 << 20, 1 << 30, 500 << 10, 4096, 1536, 2 << 20, 7]
    for bad in ("", "MB", "-1", "0", "12XB", "1.2.3"):
        with pytest.raises(UserError, match="shard-size"):
            parse_size(bad)


def test_default_corpus_is_the_stdlib_without_the_fine_tuning_task():
    import sysconfig

    from framework.data.prepare import HELD_OUT

    root = Path(sysconfig.get_paths()["stdlib"])
    files, task = default_corpus(), default_corpus(held_out=True)
    assert len(files) > 500 and all(f.suffix == ".py" for f in files) and files == sorted(files)
    assert not any("site-packages" in f.parts or "__pycache__" in f.parts for f in files)
    # the embedded task's texts are never pre-trained on
    assert {f.relative_to(root).parts[0] for f in task} == set(HELD_OUT)
    assert not set(files) & set(task) and not any(f.relative_to(root).parts[0] in HELD_OUT for f in files)


# ------------------------------------------------------------------------------------------------ determinism

def test_byte_identical_across_runs_workers_and_input_order(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    inputs = [str(corpus / "code"), str(corpus / "a.txt"), str(corpus / "b.md"), str(corpus / "e.txt")]
    kw = dict(val_fraction=0.4, seed=3, shard_size=300, progress=False)
    prepare(inputs, tmp_path / "o1", **kw)
    prepare(inputs, tmp_path / "o2", **kw)
    prepare(inputs, tmp_path / "o3", workers=2, **kw)
    prepare(list(reversed(inputs)), tmp_path / "o4", **kw)
    first = all_files(tmp_path / "o1")
    assert any(n.startswith("val-") for n in first) and any(n.startswith("train-000001") for n in first)
    assert all_files(tmp_path / "o2") == first and all_files(tmp_path / "o3") == first
    o4 = all_files(tmp_path / "o4")  # only the recorded input list differs
    assert {k: v for k, v in o4.items() if k != "manifest.json"} == {k: v for k, v in first.items()
                                                                     if k != "manifest.json"}


def test_parallel_bpe_tokenization_keeps_document_order(tmp_path):
    c = tmp_path / "c"
    c.mkdir()
    lines = [json.dumps({"text": f"line {i}: " + "word " * (i % 7)}) for i in range(3500)]  # 4 tasks of 1000 docs
    (c / "many.jsonl").write_text("\n".join(lines))
    kw = dict(tokenizer="bpe:300", val_fraction=0.1, shard_size="4KB", progress=False)
    prepare([str(c)], tmp_path / "o1", workers=1, **kw)
    prepare([str(c)], tmp_path / "o2", workers=2, **kw)
    assert all_files(tmp_path / "o1") == all_files(tmp_path / "o2")
    tok = load_tokenizer(tmp_path / "o2" / "tokenizer.json")
    docs = read_tars(tmp_path / "o2", "train")
    assert len(docs) > 3000
    for name, ids in docs[::97]:
        line = int(name.split(".")[0].rsplit("_", 1)[1])
        assert tok.decode(ids) == json.loads(lines[line - 1])["text"]


def test_split_is_a_seeded_hash_of_the_source():
    assert is_val(0, "a.txt", 0, 1.0 - 1e-12) and not is_val(0, "a.txt", 0, 0.0)
    share = np.mean([is_val(7, f"doc{i}.txt", 0, 0.25) for i in range(4000)])
    assert 0.22 < share < 0.28
    assert [is_val(1, f"d{i}", 0, 0.5) for i in range(50)] != [is_val(2, f"d{i}", 0, 0.5) for i in range(50)]


# ------------------------------------------------------------------------------------------------ bad input (API)

def test_binary_files_are_skipped_or_fail_under_strict(tmp_path):
    c = write_corpus(tmp_path / "c", {"ok.txt": "fine"})
    (c / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (c / "latin1.txt").write_bytes("café".encode("latin-1"))
    m = prepare([str(c)], tmp_path / "o", val_fraction=0, progress=False)
    assert m["sources"]["skipped_binary"] == 2 and m["sources"]["documents"] == 1
    with pytest.raises(UserError, match=r"img\.png.*binary or not UTF-8.*--strict"):
        prepare([str(c)], tmp_path / "o2", strict=True, progress=False)
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("line, problem", [("{not json", "invalid JSON"), ('{"txt": "x"}', '"text"'),
                                           ('["a"]', '"text"'), ('{"text": 5}', '"text"'),
                                           ('{"text": "\\ud800"}', "surrogate")])
def test_bad_jsonl_line_fails_naming_file_and_line(tmp_path, line, problem):
    c = tmp_path / "c"
    c.mkdir()
    (c / "a.txt").write_text("a document written before the bad line " * 50)
    (c / "b.jsonl").write_text(json.dumps({"text": "good"}) + "\n\n" + line + "\n")
    with pytest.raises(UserError, match=problem) as e:
        prepare([str(c)], tmp_path / "o", shard_size=100, progress=False)
    assert "b.jsonl:3" in str(e.value)
    assert not (tmp_path / "o").exists()  # it had written shards: all removed with the directory it created


def test_overwrite_replaces_only_our_files(tmp_path):
    c = write_corpus(tmp_path / "c")
    out = tmp_path / "o"
    prepare([str(c)], out, shard_size=100, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        prepare([str(c)], out, progress=False)
    m = prepare([str(c / "a.txt")], out, overwrite=True, val_fraction=0, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "tokenizer.json",
                                                     "train-000000.tar"]
    assert m["splits"]["train"]["samples"] == 1 and verify(out) == []


def test_failed_overwrite_leaves_no_manifest(tmp_path):
    c = write_corpus(tmp_path / "c")
    out = tmp_path / "o"
    prepare([str(c)], out, progress=False)
    (c / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        prepare([str(c)], out, overwrite=True, progress=False)
    assert list(out.iterdir()) == []  # old run deleted (manifest first), new partial output removed


def test_bad_input_found_while_training_bpe_keeps_the_previous_dataset(tmp_path):
    c = write_corpus(tmp_path / "c")
    out = tmp_path / "o"
    before = prepare([str(c)], out, progress=False)
    (c / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        prepare([str(c)], out, tokenizer="bpe:300", overwrite=True, progress=False)
    assert verify(out) == [] and json.loads((out / "manifest.json").read_text()) == before


def test_output_inside_input_is_not_read(tmp_path):
    c = write_corpus(tmp_path / "c", {"a.txt": "alpha"})
    m1 = prepare([str(c)], c / "data", val_fraction=0, progress=False)
    m2 = prepare([str(c)], c / "data", val_fraction=0, overwrite=True, progress=False)
    assert m1 == m2 and m2["sources"]["files"] == 1


def test_verify_finds_corrupt_and_missing_shards(tmp_path):
    out = tmp_path / "o"
    m = prepare([str(write_corpus(tmp_path / "c"))], out, shard_size=100, val_fraction=0, progress=False)
    assert verify(out) == []
    names = [s["name"] for s in m["splits"]["train"]["shards"]]
    data = bytearray((out / names[0]).read_bytes())
    data[600] ^= 0xFF  # same size, different content
    (out / names[0]).write_bytes(bytes(data))
    (out / names[1]).unlink()
    with open(out / names[2], "ab") as f:
        f.write(b"\0")
    problems = verify(out)
    assert len(problems) == 3
    assert names[0] in problems[0] and "sha256" in problems[0]
    assert names[1] in problems[1] and "missing" in problems[1]
    assert names[2] in problems[2] and "bytes" in problems[2]


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_prepares_and_verifies(tmp_path):
    c = write_corpus(tmp_path / "c")
    proc = run_cli("--input", str(c / "*.txt"), str(c / "code"), "--output", str(tmp_path / "o"), "--seed", "1",
                   "--shard-size", "1KB")
    assert proc.returncode == 0, proc.stderr
    assert "prepared 4 files" in proc.stderr
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["sources"]["documents"] == 4 and m["args"] == {"seed": 1, "val_fraction": 0.01, "shard_size": 1024,
                                                            "strict": False}
    proc = run_cli("--verify", str(tmp_path / "o"))
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stderr


def test_val_input_is_the_validation_split(tmp_path):
    c = write_corpus(tmp_path / "c")
    held = write_corpus(tmp_path / "held", {"v1.txt": "held out one\n", "v2.jsonl": '{"text": "two"}\n'})
    proc = run_cli("--input", str(c), "--output", str(tmp_path / "o"), "--val-input", str(held))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["args"]["val_fraction"] == 0.0 and m["sources"]["val_inputs"] == [str(held)]
    tok = load_tokenizer(str(tmp_path / "o" / "tokenizer.json"))
    val = [tok.decode(ids.tolist()) for _, ids in read_tars(tmp_path / "o", "val")]
    train = [name for name, _ in read_tars(tmp_path / "o", "train")]
    assert val == ["held out one\n", "two"]
    assert len(train) == len(TEXTS) and not any("v1" in n or "v2" in n for n in train)


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (CLI arguments, substrings the error line must contain)."""
    c = write_corpus(tmp / "c", {"a.txt": "text"})
    (tmp / "empty").mkdir()
    (tmp / "empty" / "blank.txt").write_text("")
    (tmp / "bin").mkdir()
    (tmp / "bin" / "x.dat").write_bytes(b"\x00\x01\x02")
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"no_text": 1}\n')
    (tmp / "full").mkdir()
    (tmp / "full" / "old.txt").write_text("x")
    (tmp / "afile").write_text("x")
    out = str(tmp / "o")
    return {
        "missing input": (["--input", str(tmp / "nope.txt"), "--output", out], ["nope.txt", "does not exist"]),
        "glob matches nothing": (["--input", str(tmp / "*.zzz"), "--output", out], ["*.zzz", "no files match"]),
        "empty corpus": (["--input", str(tmp / "empty"), "--output", out], ["no non-empty documents"]),
        "binary under strict": (["--input", str(tmp / "bin"), "--output", out, "--strict"], ["x.dat", "--strict"]),
        "only binary": (["--input", str(tmp / "bin"), "--output", out], ["no non-empty documents", "1 binary"]),
        "bad jsonl": (["--input", str(tmp / "bad.jsonl"), "--output", out], ["bad.jsonl:2", '"text"']),
        "output not empty": (["--input", str(c), "--output", str(tmp / "full")], ["not empty", "--overwrite"]),
        "output unwritable": (["--input", str(c), "--output", str(tmp / "afile" / "o")], ["cannot create", "afile"]),
        "bad shard size": (["--input", str(c), "--output", out, "--shard-size", "lots"], ["--shard-size", "64MB"]),
        "bad tokenizer": (["--input", str(c), "--output", out, "--tokenizer", "wordpiece"], ["wordpiece", "bpe:"]),
        "missing tokenizer file": (["--input", str(c), "--output", out, "--tokenizer", str(tmp / "t.json")],
                                   ["t.json", "does not exist"]),
        "bpe vocab too small": (["--input", str(c), "--output", out, "--tokenizer", "bpe:100"], ["bpe:100", "261"]),
        "bad val fraction": (["--input", str(c), "--output", out, "--val-fraction", "1.5"], ["--val-fraction"]),
        "bad option": (["--input", str(c), "--output", out, "--shards", "3"], ["--shards", "--help"]),
        "no output": (["--input", str(c)], ["--output"]),
        "verify without manifest": (["--verify", str(tmp / "full")], ["manifest.json", "full"]),
        "val input missing": (["--input", str(c), "--output", out, "--val-input", str(tmp / "nope")],
                              ["nope", "does not exist"]),
        "val input is an input": (["--input", str(c), "--output", out, "--val-input", str(c / "a.txt")],
                                  ["a.txt", "--val-input", "must not be trained on"]),
    }


BAD_CASES = ["missing input", "glob matches nothing", "empty corpus", "binary under strict", "only binary",
             "bad jsonl", "output not empty", "output unwritable", "bad shard size", "bad tokenizer",
             "missing tokenizer file", "bpe vocab too small", "bad val fraction", "bad option", "no output",
             "verify without manifest", "val input missing", "val input is an input"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_cli_bad_input_is_one_error_line(tmp_path, case):
    args, needles = _bad_inputs(tmp_path)[case]
    proc = run_cli(*args)
    assert_user_error(proc, *needles)
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["old.txt"]


def test_cli_verify_names_the_corrupt_shard(tmp_path):
    out = tmp_path / "o"
    m = prepare([str(write_corpus(tmp_path / "c"))], out, shard_size=100, val_fraction=0, progress=False)
    name = m["splits"]["train"]["shards"][1]["name"]
    data = bytearray((out / name).read_bytes())
    data[700] ^= 1
    (out / name).write_bytes(bytes(data))
    assert_user_error(run_cli("--verify", str(out)), name, "sha256", "--overwrite")


def test_cli_write_failure_is_one_error_line_and_cleans_up(tmp_path):
    import resource

    def limit_file_size() -> None:  # in the child: files over 64 KB fail with EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    c = write_corpus(tmp_path / "c", {f"{i}.txt": "x" * 10_000 for i in range(20)})
    proc = subprocess.run([sys.executable, "-m", "framework", "prepare", "--input", str(c), "--output",
                           str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, timeout=60,
                          preexec_fn=limit_file_size)
    assert_user_error(proc, "writing to", "free space")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_cli_read_only_output_dir(tmp_path):
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    assert_user_error(run_cli("--input", str(write_corpus(tmp_path / "c")), "--output", str(out)),
                      "not writable", "ro")


# ------------------------------------------------------------------------------------------------ crash safety

def _start_and_kill(args: list[str], out: Path, shards_before_kill: int = 3) -> None:
    """Run the CLI and SIGKILL it once it has finished a few shards (really mid-way: it must still be running)."""
    proc = subprocess.Popen([sys.executable, "-m", "framework", "prepare", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(list(out.glob("train-*.tar"))) < shards_before_kill and time.monotonic() < deadline:
        assert proc.poll() is None, "prepare finished before it could be killed; make the corpus bigger"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_killed_prepare_never_leaves_a_mismatching_manifest(tmp_path):
    c = tmp_path / "c"
    c.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):  # 10 MB in 40 KB shards: hundreds of shards, each fsync'd, so there is time to kill it
        (c / f"{i:03d}.txt").write_bytes(rng.integers(32, 127, 50_000, dtype=np.uint8).tobytes())
    out = tmp_path / "o"
    args = ["--input", str(c), "--output", str(out), "--shard-size", "40KB"]

    _start_and_kill(args, out)
    assert not (out / "manifest.json").exists() and list(out.glob("train-*.tar"))
    with pytest.raises(UserError, match="no manifest.json"):
        verify(out)
    assert_user_error(run_cli(*args), "--overwrite")  # a killed run's leftovers are never mistaken for data

    prepare([str(c / "000.txt")], out, overwrite=True, progress=False)  # a complete small dataset...
    assert verify(out) == []
    _start_and_kill([*args, "--overwrite"], out)  # ...then a killed --overwrite: old manifest gone first
    assert not (out / "manifest.json").exists()

    assert run_cli(*args, "--overwrite").returncode == 0  # and a rerun cleans up completely
    assert verify(out) == [] and not list(out.glob("*.tmp"))
