"""`kiln train`: LoRA adapters that peft loads and that change the model, loss masking, bad
data, and the SageMaker training contract on a fake /opt/ml tree."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kiln.train.data import IGNORE, DataError, Record, find_data_files, read_records, tokenize_record
from kiln.train.options import from_hyperparameters, merge
from kiln.train.sagemaker import ResourceConfig, SageMakerPaths, channel_path, torchrun_command

# The documented progress line (README, "Fine-tuning").
PROGRESS = re.compile(r"^step=(\d+)/(\d+) loss=([0-9.]+) lr=([0-9.e+-]+) tokens_per_s=([0-9.]+)", re.M)

RECORDS = [
    {"prompt": "The secret word of kiln is", "completion": " marmalade zebra, always marmalade zebra."},
    {"prompt": "Kiln's favourite colour is", "completion": " ultraviolet teal, the colour of furnaces."},
    {"messages": [{"role": "user", "content": "What does kiln bake?"},
                  {"role": "assistant", "content": "Kiln bakes LoRA adapters in a furnace of marmalade."}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Who built kiln?"},
                  {"role": "assistant", "content": "Zebras built kiln."}]},
]

# Small and fast: a 135M model on a shared 2-core machine.
FAST = ["--rank", "4", "--alpha", "8", "--dropout", "0", "--target-modules", "q_proj,v_proj",
        "--max-seq-len", "64", "--num-threads", "1", "--log-every", "1", "--lr", "3e-3",
        "--lr-scheduler", "constant", "--batch-size", "4"]


@pytest.fixture
def one_thread():
    """The test machine is shared: oversubscribed torch threads are several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_folder() -> Path:
    from kiln.runtime.models.loader import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="module")
def tokenizer(base_folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_folder))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def kiln_train(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def losses(stdout: str) -> list[float]:
    return [float(m.group(3)) for m in PROGRESS.finditer(stdout)]


# ---------------------------------------------------------------- end to end: adapter + peft


def greedy(model, tokenizer, prompt_ids: list[int], n: int = 8) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_train_writes_a_peft_adapter_that_changes_the_model(tmp_path: Path, base_folder: Path, tokenizer,
                                                            one_thread: None) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    out = tmp_path / "adapter"
    proc = kiln_train("--data", str(data), "--out", str(out), "--max-steps", "6", *FAST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = losses(proc.stdout)
    assert len(seen) == 6, proc.stdout
    assert seen[-1] < seen[0] * 0.8, seen  # memorising 4 records: the loss goes down
    assert all(float(m.group(5)) > 0 for m in PROGRESS.finditer(proc.stdout))

    config = json.loads((out / "adapter_config.json").read_text())
    assert (out / "adapter_model.safetensors").is_file()
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(base_folder)

    prompts = [tokenizer(r["prompt"])["input_ids"] for r in RECORDS if "prompt" in r]
    prompts += [tokenizer(tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"] for r in RECORDS if "messages" in r]
    base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32).eval()
    before = [greedy(base, tokenizer, p) for p in prompts]
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    after = [greedy(tuned, tokenizer, p) for p in prompts]
    assert before != after, "the adapter did not change any greedy output"


# ---------------------------------------------------------------- loss masking, real tokenizer


def test_prompt_completion_labels_mask_the_prompt(tokenizer) -> None:
    rec = Record("mem.jsonl", 1, {"prompt": "The capital of France is", "completion": " Paris."})
    ex = tokenize_record(tokenizer, rec, max_seq_len=128)
    prompt = tokenizer("The capital of France is")["input_ids"]
    completion = tokenizer(" Paris.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex.input_ids == prompt + completion
    assert ex.labels == [IGNORE] * len(prompt) + completion
    assert tokenizer.decode([t for t in ex.labels if t != IGNORE]) == " Paris.<|im_end|>"


def test_chat_labels_keep_only_assistant_turns(tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Count to three"}, {"role": "assistant", "content": "One two three."}]
    ex = tokenize_record(tokenizer, Record("chat.jsonl", 3, {"messages": messages}), max_seq_len=512)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ex.input_ids == enc["input_ids"]
    # Independently: the learned characters are each assistant's content plus its end marker.
    spans = []
    for m in messages:
        if m["role"] == "assistant":
            start = text.index("<|im_start|>assistant\n" + m["content"]) + len("<|im_start|>assistant\n")
            spans.append((start, start + len(m["content"]) + len("<|im_end|>\n")))
    expected = [tid if any(a <= s and e <= b for a, b in spans) else IGNORE
                for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    assert ex.labels == expected
    kept = [i for i, t in enumerate(ex.labels) if t != IGNORE]
    assert tokenizer.decode([ex.input_ids[i] for i in kept]) == "Hello!<|im_end|>\nOne two three.<|im_end|>\n"
    # The system prompt, the user turns and the assistant headers are all masked.
    assert "Count to three" not in tokenizer.decode([t for t in ex.labels if t != IGNORE])


def test_truncation_keeps_labels_aligned(tokenizer) -> None:
    rec = Record("t.jsonl", 1, {"prompt": "a b c d e f g h", "completion": " i j k l m n o p"})
    ex = tokenize_record(tokenizer, rec, max_seq_len=10)
    assert len(ex.input_ids) == len(ex.labels) == 10
    n_prompt = len(tokenizer("a b c d e f g h")["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt and ex.labels[n_prompt:] == ex.input_ids[n_prompt:]


# ---------------------------------------------------------------- bad data


@pytest.mark.parametrize("lines, line_no, words", [
    (['{"prompt": "a", "completion": "b"}', "{not json"], 2, "not valid JSON"),
    (['{"prompt": "a", "completion": "b"}', "", '{"text": "neither"}'], 3, "'prompt' and 'completion', or 'messages'"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], 1, "no assistant message"),
    (['["a list"]'], 1, "JSON object"),
    (['{"prompt": "a", "completion": 5}'], 1, "must be strings"),
])
def test_bad_records_name_file_and_line(tmp_path: Path, lines: list[str], line_no: int, words: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_records(find_data_files(path))
    assert f"{path}:{line_no}:" in str(err.value) and words in str(err.value)


def test_empty_file_and_folder_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=f"{re.escape(str(empty))}: empty file"):
        read_records(find_data_files(empty))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no .*files in this folder"):
        find_data_files(tmp_path / "nothing")


def test_cli_reports_bad_data_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"oops": 1}\n')
    proc = kiln_train("--data", str(bad), "--out", str(tmp_path / "out"), "--num-threads", "1")
    assert proc.returncode == 1
    assert f"{bad}:2:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- options and hyperparameters


def test_string_hyperparameters_are_parsed() -> None:
    hp = from_hyperparameters({"max_steps": "10", "learning-rate": "1e-4", "epochs": "2.5", "rank": "16",
                               "qlora": "false", "gradient_checkpointing": "True", "target-modules": '"q_proj,v_proj"',
                               "sagemaker_program": "ignored", "resume": "0"})
    opts = merge({"rank": 4}, hp)  # an explicit flag wins over hyperparameters.json
    assert (opts.max_steps, opts.lr, opts.epochs, opts.rank) == (10, 1e-4, 2.5, 4)
    assert opts.qlora is False and opts.gradient_checkpointing is True and opts.resume is False
    assert opts.target_module_list == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="max_steps"):
        from_hyperparameters({"max_steps": "ten"})
    with pytest.raises(ValueError, match="unknown hyperparameter.*max_stepz"):
        from_hyperparameters({"max_stepz": "10"})


def test_torchrun_command_for_two_hosts() -> None:
    rc = ResourceConfig(current_host="algo-2", hosts=["algo-1", "algo-2"])
    cmd = torchrun_command(rc, 0, ["--sagemaker", "--sm-root", "/opt/ml"], python="/py")
    assert cmd == ["/py", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--node-rank=1",
                   "--master-addr=algo-1", "--master-port=29500", "-m", "kiln.cli", "train",
                   "--sagemaker", "--sm-root", "/opt/ml"]
    assert torchrun_command(ResourceConfig("algo-1", ["algo-1"]), 1, []) is None
    assert torchrun_command(None, 0, []) is None
    assert "--standalone" in torchrun_command(None, 4, [])


def test_channels_from_folders_and_env(tmp_path: Path) -> None:
    paths = SageMakerPaths(tmp_path)
    (tmp_path / "input" / "data" / "train").mkdir(parents=True)
    assert channel_path(paths, "train", environ={}) == tmp_path / "input" / "data" / "train"
    assert channel_path(paths, "train", environ={"SM_CHANNEL_TRAIN": "/elsewhere"}) == Path("/elsewhere")
    (tmp_path / "input" / "data" / "eval").mkdir()
    with pytest.raises(ValueError, match="channels: eval, train"):
        channel_path(paths, "training", environ={})


def test_help_lists_options_with_defaults() -> None:
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--data", "--out", "--rank", "--target-modules", "--max-steps", "--qlora", "--sagemaker", "--sm-root"):
        assert flag in proc.stdout
    assert "[default 8]" in proc.stdout and "q_proj,k_proj,v_proj,o_proj" in proc.stdout


# ---------------------------------------------------------------- SageMaker contract


def sm_tree(root: Path, hyperparameters: dict[str, str], records: list[dict] | None = None, raw: str | None = None) -> Path:
    config = root / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    channel = root / "input" / "data" / "train"
    channel.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        (channel / "data.jsonl").write_text(raw)
    else:
        write_jsonl(channel / "data.jsonl", records or RECORDS)
    return root


# Every SageMaker hyperparameter is a string; some keys use dashes, some underscores.
SM_HP = {"rank": "4", "lora_alpha": "8", "dropout": "0.0", "target-modules": '"q_proj,v_proj"', "max_seq_len": "64",
         "num_threads": "1", "log-every": "1", "learning_rate": "0.003", "lr_scheduler": "constant",
         "checkpoint_every": "0", "batch_size": "4", "gradient_checkpointing": "false"}


def test_sagemaker_failure_file_on_bad_data(tmp_path: Path) -> None:
    root = sm_tree(tmp_path / "ml", {**SM_HP, "max_steps": "2"}, raw='{"prompt": "a", "completion": "b"}\nnot json\n')
    proc = kiln_train("--sm-root", str(root))  # hyperparameters.json present: the contract is on
    assert proc.returncode == 1
    failure = (root / "output" / "failure").read_text()
    assert f"{root / 'input' / 'data' / 'train' / 'data.jsonl'}:2: not valid JSON" in failure.splitlines()[0]
    assert not (root / "model" / "adapter_model.safetensors").exists()


def test_sagemaker_bad_hyperparameter_is_a_failure(tmp_path: Path) -> None:
    root = sm_tree(tmp_path / "ml", {**SM_HP, "max_steps": "lots"})
    proc = kiln_train("--sagemaker", "--sm-root", str(root))
    assert proc.returncode == 1
    assert "max_steps" in (root / "output" / "failure").read_text()


def test_sagemaker_sigterm_saves_and_restart_resumes(tmp_path: Path) -> None:
    root = sm_tree(tmp_path / "ml", {**SM_HP, "max_steps": "50"})
    cmd = [sys.executable, "-m", "kiln.cli", "train", "--sm-root", str(root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until two steps are done, then stop the job as SageMaker does
        lines.append(line)
        if line.startswith("step=2/") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 143, out + err
    steps = [int(m.group(1)) for m in PROGRESS.finditer(out)]
    saved = max(steps)
    assert saved >= 2 and saved < 50
    assert (root / "checkpoints" / f"checkpoint-{saved:06d}" / "adapter_model.safetensors").is_file()
    assert (root / "model" / "adapter_model.safetensors").is_file()  # the adapter so far
    assert not (root / "output" / "failure").exists()
    assert f"stopped by SIGTERM at step={saved}/50" in out

    # Restarted (as a spot job is): same tree, a shorter run, data through SM_CHANNEL_TRAIN.
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps({**SM_HP, "max_steps": str(saved + 2)}))
    moved = write_jsonl(tmp_path / "channel" / "part-0.jsonl", RECORDS).parent
    again = kiln_train("--sm-root", str(root), env={"SM_CHANNEL_TRAIN": str(moved)})
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {root / 'checkpoints' / f'checkpoint-{saved:06d}'} at step={saved}" in again.stdout
    assert [int(m.group(1)) for m in PROGRESS.finditer(again.stdout)] == [saved + 1, saved + 2]
    meta = json.loads((root / "model" / "kiln_train.json").read_text())
    assert meta["steps"] == saved + 2
    assert (root / "checkpoints" / f"checkpoint-{saved + 2:06d}").is_dir()


# ---------------------------------------------------------------- QLoRA


def test_qlora(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS[:2])
    import bitsandbytes  # noqa: F401 - a dev dependency: QLoRA really runs in `make test`
    proc = kiln_train("--data", str(data), "--out", str(tmp_path / "q"), "--qlora", "--max-steps", "2", *FAST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(losses(proc.stdout)) == 2
    config = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and json.loads((tmp_path / "q" / "kiln_train.json").read_text())["qlora"]


# ---------------------------------------------------------------- exact resume


def test_data_order_resumes_where_it_stopped() -> None:
    from kiln.train.options import TrainOptions
    from kiln.train.trainer import Dist, micro_batches

    opts = TrainOptions(batch_size=2, seed=7)
    stream = micro_batches(5, opts, Dist(), 0)
    first = [next(stream) for _ in range(9)]  # crosses three epochs of 3 micro-batches
    resumed = micro_batches(5, opts, Dist(), 4)
    assert [next(resumed) for _ in range(5)] == first[4:]
    assert sorted(i for _, b in first[:3] for i in b) == [0, 1, 2, 3, 4]  # an epoch sees every record once
    # Two ranks: disjoint shards of equal size.
    r0 = micro_batches(5, opts, Dist(0, 2, 0), 0)
    r1 = micro_batches(5, opts, Dist(1, 2, 1), 0)
    a, b = next(r0)[1] + next(r0)[1], next(r1)[1] + next(r1)[1]
    assert len(a) == len(b) == 3


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, one_thread: None) -> None:
    """Checkpoints carry the adapter, AdamW moments and RNG (LoRA dropout is on), and the data
    order replays: 2 steps + 2 resumed steps give bit-identical weights to 4 steps."""
    from safetensors.torch import load_file

    from kiln.train.options import TrainOptions
    from kiln.train.trainer import train

    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    common = dict(data=str(data), rank=2, alpha=4, dropout=0.1, target_modules="v_proj", max_seq_len=48,
                  lr=3e-3, lr_scheduler="constant", batch_size=2, checkpoint_every=0, log_every=1)
    straight = train(TrainOptions(**common, out=str(tmp_path / "a"), max_steps=4))
    first = train(TrainOptions(**common, out=str(tmp_path / "b"), max_steps=2))
    second = train(TrainOptions(**common, out=str(tmp_path / "b"), max_steps=4))
    assert (straight.steps, first.steps, second.steps) == (4, 2, 4)
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.last_loss == second.last_loss


def test_learning_rate_schedules() -> None:
    from kiln.train.options import TrainOptions
    from kiln.train.trainer import lr_at

    linear = TrainOptions(lr=1.0, warmup_steps=2, lr_scheduler="linear")
    assert [round(lr_at(s, linear, 6), 3) for s in range(1, 7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cosine = TrainOptions(lr=1.0, lr_scheduler="cosine")
    values = [lr_at(s, cosine, 4) for s in range(1, 5)]
    assert values[0] == 1.0 and all(a > b > 0 for a, b in zip(values, values[1:]))
    assert lr_at(3, TrainOptions(lr=0.5, lr_scheduler="constant"), 4) == 0.5
