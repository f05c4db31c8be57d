"""examples/train.py end to end, shortened, on a tiny model of the embedded architecture."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from knob_grpo import KnobGRPOConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--max_steps", "2", "--train_samples", "16", "--profile_samples", "2", "--profile_configs", "4", "--lookup_samples", "2",
         "--sweep_configs", "6", "--eval_samples", "2", "--num_generations", "4", "--eval_budgets", "20", "60"]


@pytest.fixture(scope="module")
def saved_executor_and_data(tmp_path_factory):
    """A randomly initialised model of the embedded architecture and a small task set, saved to disk."""
    from datasets import DatasetDict

    from knob_grpo import AdaptiveModel
    from knob_grpo.embedded import TIER_PIXELS, build_model, build_processor, knob_space, make_task_dataset

    root = tmp_path_factory.mktemp("e2e")
    AdaptiveModel(build_model(seed=0), build_processor(), knob_space=knob_space(), tier_pixels=dict(TIER_PIXELS)).save_pretrained(str(root / "model"))
    DatasetDict(train=make_task_dataset("train", 16), validation=make_task_dataset("validation", 4),
                test=make_task_dataset("test", 4)).save_to_disk(str(root / "data"))
    return root


def run(cmd, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def check_outputs(out, budgets=(20.0, 60.0)):
    from transformers import AutoModel

    import knob_grpo  # noqa: F401  (registers the controller with AutoModel)

    controller = AutoModel.from_pretrained(str(out))
    assert type(controller).__name__ == "TwoStageController"
    rows = json.loads((out / "evaluation.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert sorted({r["budget_ms"] for r in rows}) == pytest.approx(sorted(budgets))
    assert {(r["method"], r["budget_ms"]) for r in rows} >= {("controller", budgets[0]), ("lookup table", budgets[-1]), ("oracle", budgets[0])}
    assert (out / "pareto.png").stat().st_size > 1000
    # the profile the rewards used is saved next to the controller (suggest_latency_scale needs it where it is served)
    from knob_grpo import LatencyProfile

    assert any(v > 0 for v in LatencyProfile.load(out / "latency_profile.json").ttft_coef.values())
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "| controller |" in card


@pytest.fixture
def train_script(monkeypatch):
    """examples/train.py as a module."""
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "examples", "train.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_script_defaults_and_overrides(tmp_path, train_script):
    """The script's own defaults (dense answer reward, rewards not divided by the group's spread, each
    decision credited through greedy later decisions, an exploration floor for stage 1, groups of 6, two
    updates per batch of rollouts), and the command line and a YAML file override them as for any TRL script."""
    script, args = train_script.parse_args(["--output_dir", str(tmp_path)])
    assert script.answer_probability is True and args.scale_rewards == "none" and args.stage1_credit == "greedy_rest"
    assert (args.stage1_exploration, args.num_generations, args.per_device_train_batch_size) == (0.1, 6, 12)
    assert (args.num_iterations, script.train_samples) == (2, 1792)
    library = KnobGRPOConfig(output_dir=str(tmp_path))  # the library keeps TRL's defaults
    assert library.scale_rewards == "group" and library.stage1_credit == "sampled" and library.num_generations == 8
    assert library.stage1_exploration == 0.0 and library.num_iterations == 1
    script, args = train_script.parse_args(["--output_dir", str(tmp_path), "--scale_rewards", "group", "--answer_probability", "false"])
    assert script.answer_probability is False and args.scale_rewards == "group"
    (tmp_path / "run.yaml").write_text("scale_rewards: batch\n")
    _, args = train_script.parse_args(["--output_dir", str(tmp_path), "--config", str(tmp_path / "run.yaml")])
    assert args.scale_rewards == "batch"
    # a training range that would not contain the evaluated one is refused before anything loads
    script, args = train_script.parse_args(["--output_dir", str(tmp_path), "--train_budget_headroom", "0.9"])
    with pytest.raises(ValueError, match=r"train_budget_headroom=0\.9 must be a finite number >= 1"):
        train_script.main(script, args)



def test_train_script_refuses_settings_it_would_overwrite(tmp_path, train_script, monkeypatch):
    """An explicit latency margin, decision overhead or budget range is refused by name while the script derives
    it on the device (the default), before anything loads, and kept once its derivation is turned off."""

    def loading(*a, **k):
        raise AssertionError("main went on to load and train")

    monkeypatch.setattr(train_script, "PartialState", loading)
    config = tmp_path / "run.yaml"
    config.write_text("decision_overhead_ms: 0.0\n")
    cases = [(["--latency_margin", "0.2"], "latency_margin_from_profile", r"--latency_margin 0\.2"),
             (["--decision_overhead_ms", "1.5"], "measure_decision_overhead", r"--decision_overhead_ms 1\.5"),
             (["--budget_min_ms", "20", "--budget_max_ms", "60"], "budget_range_from_profile",
              r"--budget_min_ms 20\.0 and --budget_max_ms 60\.0"),
             (["--budget_max_ms", "60"], "budget_range_from_profile", r"--budget_max_ms 60\.0"),
             (["--latency_margin", "0"], "latency_margin_from_profile", r"--latency_margin 0\.0"),  # equal to the default: still given
             (["--config", str(config)], "measure_decision_overhead", r"--decision_overhead_ms 0\.0")]  # and in a YAML file
    for given, flag, named in cases:
        script, args = train_script.parse_args(["--output_dir", str(tmp_path), *given])
        with pytest.raises(ValueError, match=rf"{named}: derived on this device while --{flag} is true; pass --{flag} false"):
            train_script.main(script, args)
        script, args = train_script.parse_args(["--output_dir", str(tmp_path), *given, f"--{flag}", "false"])
        if given == ["--budget_max_ms", "60"]:  # half a range would leave the controller on its default one
            with pytest.raises(ValueError, match=r"--budget_min_ms None and --budget_max_ms 60\.0: give both ends"):
                train_script.check_settings(script, args)
            continue
        train_script.check_settings(script, args)  # accepted once the script derives nothing there
    # the defaults are not mistaken for explicit settings
    train_script.check_settings(*train_script.parse_args(["--output_dir", str(tmp_path)]))


def test_train_script_text_column(tmp_path, train_script):
    """The text column is --question_column or TRL's --prompt_column, and it is where the trainer reads
    (args.prompt_column) and the profile and the evaluation read ('prompt'); two different columns, or one the
    dataset lacks, are refused by name before anything loads."""
    from datasets import Dataset, DatasetDict

    def saved(name, **columns):
        rows = Dataset.from_dict({**columns, "answer": ["red", "blue"]})
        DatasetDict(train=rows, validation=rows, test=rows).save_to_disk(str(tmp_path / name))
        return ["--output_dir", str(tmp_path / "out"), "--dataset_name", str(tmp_path / name)]

    trl_style = saved("trl", prompt=["what is red ?", "what is blue ?"])
    other = saved("other", text=["what is red ?", "what is blue ?"], question=["unused", "unused"])
    for argv in (trl_style, trl_style + ["--prompt_column", "prompt"], trl_style + ["--question_column", "prompt"],
                 other + ["--prompt_column", "text"], other + ["--question_column", "text"]):
        script, args = train_script.parse_args(argv)
        for rows in train_script.load_data(script, args):
            assert [row[args.prompt_column] for row in rows] == ["what is red ?", "what is blue ?"], argv
            assert rows[0]["prompt"] == "what is red ?" and rows[0]["answer"] == "red"
    script, args = train_script.parse_args(other)  # no flag: the default 'prompt' is absent, 'question' is used
    assert train_script.load_data(script, args)[0][0][args.prompt_column] == "unused"
    script, args = train_script.parse_args(other + ["--question_column", "question", "--prompt_column", "text"])
    with pytest.raises(ValueError, match=r"--question_column 'question' and --prompt_column 'text' both name the text column"):
        train_script.load_data(script, args)
    script, args = train_script.parse_args(trl_style + ["--question_column", "query"])
    with pytest.raises(ValueError, match=r"text column 'query' is not in the dataset \(its columns: prompt, answer\)"):
        train_script.load_data(script, args)
    script, args = train_script.parse_args(trl_style + ["--image_column", "picture"])  # used to train text-only, without a word
    with pytest.raises(ValueError, match=r"--image_column 'picture' is not in the dataset \(its columns: prompt, answer\)"):
        train_script.load_data(script, args)
    script, args = train_script.parse_args(trl_style + ["--answer_column", "label"])
    with pytest.raises(ValueError, match=r"--answer_column 'label' is not in the dataset \(its columns: prompt, answer\)"):
        train_script.load_data(script, args)


def test_train_script_splits(tmp_path, train_script):
    """A missing split is named with the splits there are and its flag; a folder holding a single Dataset is
    explained (the script needs three splits)."""
    from datasets import Dataset, DatasetDict

    rows = Dataset.from_dict({"prompt": ["what is red ?"], "answer": ["red"]})
    DatasetDict(train=rows, test=rows).save_to_disk(str(tmp_path / "two"))
    rows.save_to_disk(str(tmp_path / "single"))
    script, args = train_script.parse_args(["--output_dir", str(tmp_path / "out"), "--dataset_name", str(tmp_path / "two")])
    with pytest.raises(ValueError, match=r"--dataset_profile_split 'validation': .*two has no such split; its splits are 'train', 'test' "
                                         r"\(pass --dataset_profile_split with one of them\)"):
        train_script.load_data(script, args)
    script.dataset_profile_split = "test"
    assert [len(split) for split in train_script.load_data(script, args)] == [1, 1, 1]
    script.dataset_name = str(tmp_path / "single")
    with pytest.raises(ValueError, match=r"single holds a single Dataset \(Dataset.save_to_disk\); the script needs train, profile "
                                         r"and test splits: save a DatasetDict"):
        train_script.load_data(script, args)



def test_train_script_controller_budget_range(tmp_path, train_script):
    """The controller gets the budget range set in KnobGRPOConfig, and its own default range while that is unset
    (as before the profile sets it, when the decision overhead is measured)."""
    from knob_grpo import AdaptiveModel, TwoStageController
    from knob_grpo.embedded import TIER_PIXELS, build_model, build_processor, knob_space

    executor = AdaptiveModel(build_model(seed=0), build_processor(), knob_space=knob_space(), tier_pixels=dict(TIER_PIXELS))
    script, args = train_script.parse_args(["--output_dir", str(tmp_path)])
    default = TwoStageController.for_executor(executor).config.budget_range
    assert train_script.new_controller(executor, script, args).config.budget_range == default
    script, args = train_script.parse_args(["--output_dir", str(tmp_path), "--budget_range_from_profile", "false",
                                            "--budget_min_ms", "20", "--budget_max_ms", "60"])
    assert tuple(train_script.new_controller(executor, script, args).config.budget_range) == (20.0, 60.0)


@pytest.mark.slow
def test_train_script_single_process(saved_executor_and_data, tmp_path):
    root = saved_executor_and_data
    proc = run([sys.executable, "examples/train.py", "--model_name_or_path", str(root / "model"), "--dataset_name", str(root / "data"),
                "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "8", "--answer_probability", "true", "--logging_steps", "1", *SHORT])
    check_outputs(tmp_path / "out")
    # the dense answer reward reached TRL's logs, as a probability
    logged = re.findall(r"'rewards/answer_probability_reward_within_budget/mean': '([0-9.e-]+)'", proc.stdout + proc.stderr)
    assert logged and all(0.0 <= float(v) <= 1.0 for v in logged)
    # the controller was evaluated with a latency scale from the lookup table's runs, against the margin it trained with
    margin = float(re.search(r"latency margin ([0-9.]+);", proc.stdout).group(1))
    scale = re.search(r"- controller latency scale: [0-9.]+ \(.*lookup table's calibration runs, against the profile and "
                      r"the ([0-9.]+)% latency margin", (tmp_path / "out" / "evaluation.md").read_text())
    assert scale, "evaluation.md reports no latency scale from the lookup table's runs"
    assert float(scale.group(1)) == pytest.approx(100 * margin, abs=0.05)
    # the controller trained on budgets reaching 1.5 times the top of the range the evaluation's default budgets span
    lo, hi, train_hi = map(float, re.search(r"budget range ([0-9.]+)-([0-9.]+) ms \(training to ([0-9.]+) ms\)", proc.stdout).groups())
    assert train_hi == pytest.approx(round(1.5 * hi, 1)) and lo < hi
    from transformers import AutoModel

    config = AutoModel.from_pretrained(str(tmp_path / "out")).config
    assert (config.budget_min_ms, config.budget_max_ms) == (lo, train_hi)


@pytest.mark.slow
def test_train_script_two_processes(saved_executor_and_data, tmp_path):
    root = saved_executor_and_data
    # accelerate 1.15 starts one process for `--cpu --num_processes 2`; `--multi_gpu` starts two, which
    # KnobGRPOConfig (use_cpu defaults to True without a GPU) joins into a gloo group.
    short = SHORT[: SHORT.index("--eval_budgets")]  # the default budgets: 5, spaced over the profiled range
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "examples/train.py", "--model_name_or_path", str(root / "model"),
                "--dataset_name", str(root / "data"), "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", *short])
    # they span the profiled range, which ends inside the trained one (train_budget_headroom)
    lo, hi, train_hi = map(float, re.search(r"budget range ([0-9.]+)-([0-9.]+) ms \(training to ([0-9.]+) ms\)", proc.stdout).groups())
    assert hi < train_hi
    check_outputs(tmp_path / "out", budgets=[round(lo * (hi / lo) ** (i / 4), 1) for i in range(5)])
    assert not any(p.name.startswith("checkpoint") for p in (tmp_path / "out").iterdir())
