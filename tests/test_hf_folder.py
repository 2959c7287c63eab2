"""`kiln export DIR`: a Hugging Face checkpoint folder as the source (compiler/capture/hf_folder.py)."""

from __future__ import annotations

import json

import pytest
from kiln.compiler.capture.hf_folder import infer_task, parse_shapes, tokenizer_files
from kiln.compiler.errors import UsageError

from tests.conftest import run_cli
from tests.models import hf_folders

pytest.importorskip("transformers")

# task -> (the output the export has, its input names)
EXPECTED = {
    "text-generation": ("logits", None),
    "text-classification": ("logits", ["input_ids", "attention_mask"]),
    "token-classification": ("logits", ["input_ids", "attention_mask"]),
    "feature-extraction": ("last_hidden_state", ["input_ids", "attention_mask"]),
    "image-classification": ("logits", ["pixel_values"]),
    "encoder": ("last_hidden_state", ["input_ids", "attention_mask"]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One checkpoint folder per task, written by save_pretrained."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {task: make(root / task) for task, make in hf_folders.FOLDERS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(hf_folders.FOLDERS))
def test_each_task_is_inferred_exported_and_gated(folders, task, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli("export", folders[task], "-t", "onnx", "--out", out, capsys=capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["published"] and manifest["parity"]["passed"]
    checkpoint = manifest["source"]["checkpoint"]
    assert checkpoint["task"] == task and checkpoint["folder"] == str(folders[task])
    output, inputs = EXPECTED[task]
    assert manifest["outputs"][0]["name"] == output
    if inputs is not None:
        assert [i["name"] for i in manifest["inputs"]] == inputs
    if task == "text-generation":
        assert manifest["parity"]["generation"]["passed"]
    if task == "image-classification":
        assert manifest["inputs"][0]["shape"] == [1, 3, 32, 32]  # the config's image_size and channels
    if task in ("text-classification", "feature-extraction"):
        assert manifest["inputs"][0]["shape"] == [1, 64]  # min(128, max_position_embeddings=64)


@pytest.mark.slow
def test_tokenizer_travels_with_the_export_and_run_generates_text(folders, tmp_path, capsys):
    out = tmp_path / "lm"
    code, _, err = run_cli("export", folders["text-generation"], "-t", "onnx", "--out", out, "-q", capsys=capsys)
    assert code == 0, err
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    listed = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= listed
    code, printed, err = run_cli(
        "run", out, "--generate", "--prompt", "the cat sat", "--max-new-tokens", "6", "--json", capsys=capsys
    )
    assert code == 0, err
    result = json.loads(printed)
    assert result["prompt"] == [3, 4, 5]  # the folder's tokenizer encoded it
    code, printed, _ = run_cli("run", out, "--generate", "3,4,5", "--max-new-tokens", "6", capsys=capsys)
    assert code == 0
    ids = [int(t) for t in printed.strip().split(",")]
    end = ids.index(2) if 2 in ids else len(ids)  # the text stops at the tokenizer's end token, </s> (2)
    assert result["generated"] == ids[:end]
    assert result["text"] == " ".join(hf_folders.VOCAB[t] for t in ids[:end])
    assert run_cli("verify", out, capsys=capsys)[0] == 0


@pytest.mark.slow
def test_shape_and_task_override_the_config(folders, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run_cli(
        "export", folders["token-classification"], "-t", "onnx", "--out", out, "-q",
        "--task", "feature-extraction", "--shape", "input_ids=2x16", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"]["task"] == "feature-extraction"
    assert [i["shape"] for i in manifest["inputs"]] == [[2, 16], [2, 16]]  # the mask follows input_ids
    assert manifest["outputs"][0]["name"] == "last_hidden_state"


def test_library_takes_a_folder(folders, tmp_path):
    import kiln

    result = kiln.export(str(folders["text-classification"]), target="onnx", out=tmp_path / "lib")
    assert result.published and result.manifest.source["checkpoint"]["task"] == "text-classification"


def test_pickled_weights_are_refused_unless_trusted(tmp_path, capsys):
    folder = hf_folders.pickled_only(tmp_path / "pickled")
    code, _, err = run_cli("export", folder, "-t", "onnx", "--out", tmp_path / "o", capsys=capsys)
    assert code == 2 and "pickles only (pytorch_model.bin)" in err and "--trust-pickle" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(
        "export", folder, "-t", "onnx", "--out", tmp_path / "o", "-q", "--trust-pickle", capsys=capsys
    )
    assert code == 0, err


def test_remote_code_is_refused_unless_trusted(tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = hf_folders.remote_code(tmp_path / "custom", marker)
    code, _, err = run_cli("export", folder, "-t", "onnx", "--out", tmp_path / "o", capsys=capsys)
    assert code == 2 and "auto_map" in err and "--trust-remote-code" in err
    assert not marker.exists() and not (tmp_path / "o").exists()
    code, _, err = run_cli(
        "export", folder, "-t", "onnx", "--out", tmp_path / "o", "-q", "--trust-remote-code", capsys=capsys
    )
    assert code == 0, err
    assert marker.read_text() == "ran"  # trusted: the folder's own code ran


def test_bad_requests_are_one_line_errors(folders, tmp_path, capsys):
    folder = folders["text-classification"]
    cases = [
        (["--task", "summarize"], "--task summarize: unknown task"),
        (["--shape", "input_ids=1xq"], "is not NAME=DIMS"),
        (["--shape", "pixel_values=1x3x8x8"], "the model has no such input"),
    ]
    for flags, message in cases:
        code, _, err = run_cli("export", folder, "-t", "onnx", "--out", tmp_path / "o", *flags, capsys=capsys)
        assert code == 2 and message in err, err
    code, _, err = run_cli(
        "export", "zoo:cnn", "-t", "onnx", "--out", tmp_path / "o", "--task", "image-classification", capsys=capsys
    )
    assert code == 2 and "applies to a checkpoint folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("export", tmp_path / "empty", "-t", "onnx", "--out", tmp_path / "o", capsys=capsys)
    assert code == 2 and "holds no config.json" in err


def test_run_prompt_needs_a_tokenizer(tmp_path, capsys):
    folder = hf_folders.causal_lm(tmp_path / "lm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    out = tmp_path / "o"
    assert run_cli("export", folder, "-t", "onnx", "--out", out, "-q", capsys=capsys)[0] == 0
    assert not (out / "tokenizer").exists()
    code, _, err = run_cli("run", out, "--generate", "--prompt", "the cat", capsys=capsys)
    assert code == 2 and "carries no tokenizer" in err


def test_a_tokenizer_file_linking_out_of_the_folder_is_refused_not_copied(tmp_path, capsys):
    """The tokenizer files travel into the export byte for byte: one that links outside the folder (a secret, say)
    stops the export with a one-line error instead of being copied; a link inside the folder is followed."""
    folder = hf_folders.causal_lm(tmp_path / "lm")
    secret = tmp_path / "secret.txt"
    secret.write_text("not a tokenizer")
    (folder / "merges.txt").symlink_to(secret)
    out = tmp_path / "o"
    code, _, err = run_cli("export", folder, "-t", "onnx", "--out", out, "-q", capsys=capsys)
    assert code == 2 and "merges.txt is a symbolic link leading outside" in err and "Traceback" not in err
    assert not out.exists()
    (folder / "merges.txt").unlink()
    (folder / "vocab.txt").write_text("w3\n")
    (folder / "merges.txt").symlink_to("vocab.txt")  # inside the folder: carried
    assert [p.name for p in tokenizer_files(folder)][-2:] == ["vocab.txt", "merges.txt"]


def test_task_inference_follows_the_architecture():
    assert infer_task({"architectures": ["GPT2LMHeadModel"]}) == "text-generation"
    assert infer_task({"architectures": ["MistralForCausalLM"]}) == "text-generation"
    assert infer_task({"architectures": ["RobertaForSequenceClassification"]}) == "text-classification"
    assert infer_task({"architectures": ["ConvNextForImageClassification"]}) == "image-classification"
    assert infer_task({"architectures": ["BertForMaskedLM"]}) == "fill-mask"
    assert infer_task({"architectures": ["BertModel"]}) == "feature-extraction"
    assert infer_task({"architectures": ["WhisperForConditionalGeneration"], "is_encoder_decoder": True}) == "encoder"
    with pytest.raises(UsageError, match="cannot tell the task"):
        infer_task({"architectures": ["LlavaForConditionalGeneration"]})
    assert parse_shapes(["input_ids=1x64", "pixel_values=1,3,8,8"]) == {
        "input_ids": (1, 64),
        "pixel_values": (1, 3, 8, 8),
    }
