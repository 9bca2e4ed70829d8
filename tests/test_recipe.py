"""python -m infir2_jax.recipe: stages chained run to run, complete ones skipped, the table."""

from __future__ import annotations

import pytest
import yaml
from conftest import EVALSCOPE_PYTHON, evalscope_missing, free_port

from infir2_jax.config import ConfigError
from infir2_jax.recipe import load_recipe, main, plan

# recipe_tiny at its smallest: a few steps of short rows per stage.
SMALLEST = [
    "cpt:train.steps=2", "cpt:train.seq_len=64",
    "sft:train.steps=2", "sft:train.seq_len=128", "sft:train.eval_every=0",
    "rl:train.steps=1", "rl:rl.prompts_per_step=2", "rl:rl.n=2", "rl:train.batch_size=4",
    "rl:rl.max_new_tokens=4",
]  # fmt: skip


def _args(run_root, *extra):
    return ["--config", "recipe_tiny", "--run-root", str(run_root), *extra] + [
        a for s in SMALLEST for a in ("--set", s)
    ]


def test_recipe_configs_chain_every_stage_from_the_previous_one():
    for name, expected in [
        ("recipe_tiny", ["cpt", "sft", "rl", "eval"]),
        ("recipe_1p5b", ["cpt", "decay", "sft1", "sft2", "rl1", "rl2", "eval"]),
        ("recipe_7b", ["cpt", "decay", "sft1", "sft2", "rl1", "rl2", "eval"]),
    ]:
        recipe = load_recipe(name)
        planned = plan(recipe, {})
        assert [p.stage.name for p in planned] == expected
        assert [p.kind for p in planned][-1] == "eval"
        for before, p in zip(planned, planned[1:], strict=False):
            assert p.source == str(before.run_dir)
            if p.kind == "eval":
                continue
            if p.stage.start == "resume_from":  # the decay job continues the CPT run
                assert p.config.train.resume_from == f"{before.run_dir}/checkpoints"
                assert p.config.train.init_from is None
            else:
                assert p.config.train.init_from == str(before.run_dir)
    # InfiR2's CPT runs its stable phase to the decay's start; the decay job takes it over.
    big = plan(load_recipe("recipe_1p5b"), {})
    assert big[0].config.train.steps == big[1].config.optim.decay_start == 35000
    assert big[1].config.train.steps == 40000 and big[1].config.optim.warmup_steps == 0


def test_recipe_tiny_runs_chained_then_skips_complete_stages(tmp_path, capfd):
    assert main(_args(tmp_path, "--until", "rl")) == 0
    out = capfd.readouterr().out  # the stages run as commands of their own
    # Each stage started from the previous stage's run (the config each run saved).
    for stage, source in [("sft", "cpt"), ("rl", "sft")]:
        saved = yaml.safe_load((tmp_path / stage / "config.yaml").read_text())
        assert saved["train"]["init_from"] == str(tmp_path / source)
        assert f"stage {['cpt', 'sft', 'rl'].index(stage) + 1}/4: {stage}" in out
    rows = _table(out)
    assert [r[:4] for r in rows] == [
        ["cpt", "tiny_cpt", "ran", "2/2"],
        ["sft", "tiny_sft", "ran", "2/2"],
        ["rl", "tiny_rl", "ran", "1/1"],
        ["eval", "eval_tiny", "not", "run"],
    ]
    # From the stage's first logged value to its last: a fresh model's loss over the bytes
    # tokenizer's 320 padded ids (ln 320 ≈ 5.8)
    assert rows[0][4:7] == ["loss", rows[0][5], "->"] and float(rows[0][5]) > 5
    assert rows[2][4] == "reward"
    assert all(r[-1].endswith("s") for r in rows[:3])  # seconds taken

    # Again: every stage is complete, nothing runs, the table reads the runs' metrics.
    assert main(_args(tmp_path, "--until", "rl")) == 0
    again = capfd.readouterr().out
    assert "== stage" not in again
    assert [r[:6] for r in _table(again)[:3]] == [[*r[:2], "complete", *r[3:6]] for r in rows[:3]]
    # A longer RL stage is no longer complete: it would resume; the others stay done.
    assert main([*_args(tmp_path), "--set", "rl:train.steps=2", "--dry-run"]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert [line.rsplit("[", 1)[1] for line in lines] == [
        "complete]", "complete]", "to run]", "to run]",
    ]  # fmt: skip
    assert lines[3].startswith(f"eval: eval eval_tiny from {tmp_path / 'rl'} (model)")

    # The evaluation stage, where evalscope is installed (CI: INFIR2_EVALSCOPE_PYTHON): the RL
    # run exported with the bytes tokenizer, served, and graded by evalscope.
    if evalscope_missing():
        return
    evaluation = [
        f"eval:eval.port={free_port()}", f"eval:eval.evalscope_python={EVALSCOPE_PYTHON}",
        "eval:eval.max_tokens=4", "eval:eval.serve_batch_size=2",
        "eval:eval.benchmarks=[{name: gsm8k, dataset: 'bundled:arithmetic', limit: 2, "
        "prompt_template: '{question}'}]",
    ]  # fmt: skip
    assert main(_args(tmp_path, *(a for s in evaluation for a in ("--set", s)))) == 0
    row = _table(capfd.readouterr().out)[3]
    assert row[:3] == ["eval", "eval_tiny", "ran"] and row[3] == "gsm8k", row
    assert (tmp_path / "eval" / "model-step1-bf16" / "tokenizer.json").is_file()


def _table(out: str) -> list[list[str]]:
    lines = out.split("recipe recipe_tiny:\n", 1)[1].splitlines()
    return [line.split() for line in lines[2:6]]


def test_a_bad_recipe_is_one_error_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "stages": [
                    {"name": "cpt", "config": "tiny_cpt"},
                    {"name": "sft", "config": "no_such_config"},
                ]
            }
        )  # fmt: skip
    )
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: stages[1] (sft): config 'no_such_config'")
    for args, message in [
        (["--until", "nope"], "error: --until: no stage 'nope' (stages: cpt, sft, rl, eval)"),
        (["--set", "nope:train.steps=1"], "error: --set nope:train.steps=1: no stage 'nope'"),
        (["--set", "cpt:train.stepz=1"], "error: stage cpt (tiny_cpt): unknown config key"),
        (["--set", "train.steps=1"], "error: --set expects STAGE:section.key=value"),
    ]:
        assert main(["--config", "recipe_tiny", "--dry-run", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
    bad.write_text(yaml.safe_dump({"stages": [{"name": "a", "config": "eval_tiny"}]}))
    assert main(["--config", str(bad)]) == 2
    assert "an eval stage needs a stage before" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"stages": [{"name": "a", "config": "tiny_cpt", "stat": 1}]}))
    with pytest.raises(ConfigError, match=r"unknown config key 'stages\[0\]\.stat'"):
        load_recipe(bad)
    stages = [{"name": "a", "config": "tiny_cpt"}, {"name": "a", "config": "tiny_sft"}]
    bad.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: stages\[1\]\.name: 'a' names two stages"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump({"stages": []}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: stages: at least one"):
        load_recipe(bad)


def test_a_failing_stage_ends_the_recipe_with_its_status(tmp_path, capfd):
    recipe = tmp_path / "r.yaml"
    missing = tmp_path / "missing.jsonl"
    recipe.write_text(
        yaml.safe_dump(
            {
                "run_root": str(tmp_path),
                "stages": [
                    {
                        "name": "cpt",
                        "config": "tiny_cpt",
                        "set": ["data.source=jsonl", f"data.path={missing}"],
                    },
                    {"name": "sft", "config": "tiny_sft"},
                ],
            }
        )  # fmt: skip
    )
    assert main(["--config", str(recipe)]) == 2
    out, err = capfd.readouterr()
    assert f"error: data.path: {missing}: data file not found" in err  # the stage's own line
    assert [line.split()[:3] for line in out.split(f"recipe {recipe}:\n")[1].splitlines()[2:]] == [
        ["cpt", "tiny_cpt", "failed"],
        ["sft", "tiny_sft", "not"],
    ]
