"""Strict typed config parsing, overrides, the CLI's errors, the LR schedule."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import pytest
import yaml
from conftest import ROOT
from flax import nnx

from infir2_jax.config import (
    CONFIG_DIR,
    ConfigError,
    OptimConfig,
    dump_config,
    load_config,
    parse_config,
)
from infir2_jax.model import Qwen2
from infir2_jax.train.optimizer import learning_rate_schedule


def test_all_configs_parse_and_round_trip():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {
        "tiny_cpt", "tiny_sft", "cpt_7b", "cpt_7b_decay", "cpt_1p5b", "cpt_1p5b_decay",
        "sft_7b_stage1", "sft_7b_stage2", "sft_1p5b_stage1", "sft_1p5b_stage2",
        "tiny_rl", "rl_7b_stage1", "rl_7b_stage2", "rl_1p5b_stage1", "rl_1p5b_stage2",
    } <= set(names)  # fmt: skip
    for name in names:
        if name.startswith(("eval_", "recipe_")):  # test_eval_configs, tests/test_recipe.py
            continue
        cfg = load_config(name)
        assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_eval_configs():
    from infir2_jax.config import load_eval_config

    for name in ("eval_tiny", "eval_recipe_7b", "eval_recipe_1p5b"):
        cfg = load_eval_config(name)
        assert cfg.system_prompt.endswith("within \\boxed{}.")
    recipe = load_eval_config("eval_recipe_7b")
    assert (recipe.temperature, recipe.top_p, recipe.weights) == (0.65, 0.95, "fp8_block")
    settings = {b.name: (b.repeats, b.max_tokens or recipe.max_tokens) for b in recipe.benchmarks}
    assert settings == {
        "aime24": (32, 31000), "aime25": (32, 31000), "gpqa_diamond": (8, 26000),
        "live_code_bench": (8, 27000),
    }  # fmt: skip
    with pytest.raises(ConfigError, match="eval.benchmarks\\[0\\].repeats|repeats"):
        load_eval_config("eval_tiny", ["eval.benchmarks=[{name: gsm8k, repeats: 0}]"])
    with pytest.raises(ConfigError, match="unknown config key 'eval.tempeature'"):
        load_eval_config("eval_tiny", ["eval.tempeature=0"])


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_merges_mappings_and_replaces_lists_and_scalars(tmp_path):
    _write(
        tmp_path / "parent.yaml", "base: tiny_cpt\ntrain: {steps: 7}\nfp8: {bf16_layers: [0, 1]}\n"
    )
    child = _write(
        tmp_path / "sub" / "child.yaml",  # a base path is relative to the file naming it
        "base: ../parent\noptim: {lr: 1.0e-3}\nfp8: {bf16_layers: [-1]}\n",
    )
    cfg, tiny = load_config(child), load_config("tiny_cpt")
    assert cfg.train == dataclasses.replace(tiny.train, steps=7)  # chained: tiny_cpt -> parent
    assert cfg.optim == dataclasses.replace(tiny.optim, lr=1e-3)  # merged key by key
    assert cfg.fp8.bf16_layers == (-1,)  # a list replaces, it does not append
    assert cfg.model == tiny.model and cfg.data == tiny.data
    over = load_config(child, ["train.steps=9", "fp8.bf16_layers=[2]"])  # --set after the merge
    assert (over.train.steps, over.fp8.bf16_layers, over.optim.lr) == (9, (2,), 1e-3)
    assert "base" not in yaml.safe_load(dump_config(cfg))


def test_base_errors_name_the_files(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b\ntrain: {steps: 1}\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(a)
    missing = _write(tmp_path / "m.yaml", "base: no_such_base\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: base 'no_such_base' not found"):
        load_config(missing)
    child = _write(tmp_path / "c.yaml", "base: tiny_cpt\ntrain: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'train\.stepz'"):
        load_config(child)
    _write(tmp_path / "p.yaml", "base: tiny_cpt\ntrain: {steps: many}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: train\.steps: expected an integer"):
        load_config(_write(tmp_path / "q.yaml", "base: p\n"))  # the file that set the key
    with pytest.raises(ConfigError, match="^unknown config key 'train.stepz'"):
        load_config(child, ["train={steps: 3, stepz: 4}"])  # overridden: no file to name


def test_recipe_configs_inherit_and_bases_are_not_listed():
    assert (CONFIG_DIR / "base" / "cpt.yaml").is_file()
    with pytest.raises(ConfigError) as e:
        load_config("no_such_config")
    assert "cpt_7b" in str(e.value) and "'cpt'" not in str(e.value)
    assert "base:" in (CONFIG_DIR / "sft_7b_stage2.yaml").read_text()


@pytest.mark.parametrize("name,params", [("cpt_7b", 7_615_616_512), ("cpt_1p5b", 1_543_714_304)])
def test_recipe_configs(name, params):
    cfg = load_config(name)
    assert cfg.model.num_params == params
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len) == (40000, 128, 32768)
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.eps) == (0.9, 0.95, 1e-8)
    assert (cfg.optim.weight_decay, cfg.optim.clip_norm, cfg.model.init_std) == (0.1, 1.0, 0.008)
    model = nnx.eval_shape(lambda: Qwen2(cfg.model, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == params


def test_wsd_schedule_has_the_recipe_values():
    schedule = learning_rate_schedule(load_config("cpt_7b").optim, 40000)
    assert float(schedule(0)) == 0.0
    assert float(schedule(2500)) == pytest.approx(5e-5)
    assert float(schedule(5000)) == pytest.approx(1e-4)
    assert float(schedule(20000)) == pytest.approx(1e-4)
    assert float(schedule(35000)) == pytest.approx(1e-4)
    assert float(schedule(37500)) == pytest.approx(5.5e-5)
    assert float(schedule(40000)) == pytest.approx(1e-5)
    cosine = learning_rate_schedule(OptimConfig(lr=2e-5, min_lr=2e-6, warmup_steps=50), 1000)
    assert float(cosine(50)) == pytest.approx(2e-5) and float(cosine(1000)) == pytest.approx(2e-6)


@pytest.mark.parametrize("size", ["7b", "1p5b"])
def test_decay_configs_continue_the_stable_phase(size):
    stable, decay = load_config(f"cpt_{size}"), load_config(f"cpt_{size}_decay")
    assert decay.model == stable.model and decay.data == stable.data
    assert decay.train.resume_from == f"{stable.train.run_dir}/checkpoints/35000"
    assert decay.train.init_from is None and decay.optim.warmup_steps == 0
    schedule = learning_rate_schedule(decay.optim, decay.train.steps)
    assert float(schedule(35000)) == pytest.approx(1e-4)
    assert float(schedule(37500)) == pytest.approx(5.5e-5)
    assert float(schedule(40000)) == pytest.approx(1e-5)
    assert stable.data.split == (0.90, 0.05, 0.05) and stable.train.eval_every == 100


@pytest.mark.parametrize("size,lr", [("7b", 2e-5), ("1p5b", 5e-5)])
def test_sft_configs_have_the_recipe_numbers(size, lr):
    one, two = load_config(f"sft_{size}_stage1"), load_config(f"sft_{size}_stage2")
    assert one.train.init_from == f"runs/cpt_{size}_decay"  # the CPT output
    assert two.train.init_from == one.train.run_dir  # stage 2 starts from stage 1
    for cfg, samples in ((one, 72_000), (two, 165_000)):
        assert cfg.data.kind == "sft" and cfg.data.chat_template == "qwen2.5"
        assert (cfg.train.batch_size, cfg.train.seq_len, cfg.execution.remat) == (64, 32768, "full")
        assert cfg.train.steps == -(-5 * samples // 64)  # 5 epochs of one sample per row
        steps = cfg.train.steps
        schedule = learning_rate_schedule(cfg.optim, steps)
        warmup = round(0.05 * steps)
        assert float(schedule(warmup // 2)) == pytest.approx(lr * (warmup // 2) / warmup)
        assert float(schedule(warmup)) == pytest.approx(lr)
        assert float(schedule(steps)) == pytest.approx(lr / 10)
        mid = (warmup + steps) // 2
        assert float(schedule(mid)) == pytest.approx(lr / 10 + 0.45 * lr, rel=1e-3)


def test_warmup_fraction_and_steps_are_exclusive():
    with pytest.raises(ValueError, match="set one, not both"):
        learning_rate_schedule(OptimConfig(lr=1.0, warmup_steps=5, warmup_fraction=0.1), 100)


def test_overrides_are_typed():
    cfg = load_config("tiny_cpt", ["train.steps=7", "optim.lr=1e-3", "execution.remat=full"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.execution.remat == "full"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.stepz=3", "train.stepz"),
        ("optimm.lr=1", "optimm"),
        ("model.hidden=3", "model.hidden"),
        ("train.steps=many", "train.steps: expected an integer"),
        ("execution.remat=sometimes", "execution.remat"),
        ("model.remat=full", "model.remat is now execution.remat"),
        ("model.attention_impl=auto", "model.attention_impl is now execution.attention_impl"),
        ("execution.attention_block=100", "execution.attention_block must be a power of two"),
        ("fp8.recipe=fp4", "fp8.recipe"),
        ("fp8.bf16_layers=3", "fp8.bf16_layers: expected a list"),
        ("model.preset=qwen9", "qwen9"),
        ("model.num_kv_heads=3", "num_kv_heads"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpt", [override])


def test_rl_loss_is_a_nested_section_and_old_keys_name_the_new_one(tmp_path):
    cfg = load_config("tiny_rl", ["rl.loss.kl_coef=0.1", "rl.loss.aggregation=token_mean"])
    assert (cfg.rl.loss.kl_coef, cfg.rl.loss.aggregation, cfg.rl.loss.clip_high) == (
        0.1, "token_mean", 0.28,
    )  # fmt: skip
    assert not hasattr(cfg.rl, "kl_coef")  # no copies beside the section
    with pytest.raises(ConfigError, match="'rl.clip_low' is now 'rl.loss.clip_low'"):
        load_config("tiny_rl", ["rl.clip_low=0.1"])
    old = _write(tmp_path / "old.yaml", "base: tiny_rl\nrl: {kl_coef: 0.1}\n")
    with pytest.raises(ConfigError, match="old.yaml: config key 'rl.kl_coef' is now 'rl.loss"):
        load_config(old)
    with pytest.raises(ConfigError, match="rl.loss: kl_coef must be >= 0"):
        load_config("tiny_rl", ["rl.loss.kl_coef=-1"])


def test_cli_exits_nonzero_naming_the_key(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "infir2_jax.train", "--config", "tiny_cpt",
         "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "train.stepz=3"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2
    assert "train.stepz" in r.stderr
    assert not (tmp_path / "run").exists()
    r = subprocess.run(
        [sys.executable, "-m", "infir2_jax.train", "--config", "no_such_config"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2 and "no_such_config" in r.stderr


@pytest.mark.parametrize("size", ["7b", "1p5b"])
def test_rl_recipe_configs(size):
    """docs/recipe.md "RL": 128 x 16 samples, 384 prompts at most, 8K then 16K tokens at
    temperature 1.0 then 1.1, clip 0.2 / 0.28, TIS cap 2, LR 1e-6, betas (0.9, 0.98)."""
    for stage, tokens, temperature in ((1, 8192, 1.0), (2, 16384, 1.1)):
        cfg = load_config(f"rl_{size}_stage{stage}")
        rl = cfg.rl
        assert (rl.prompts_per_step, rl.n, rl.prompts_per_step * rl.max_sampling_rounds) == (
            128, 16, 384,
        )  # fmt: skip
        assert (rl.max_new_tokens, rl.temperature) == (tokens, temperature)
        loss = rl.loss
        assert (loss.clip_low, loss.clip_high, loss.tis_cap, rl.reward) == (0.2, 0.28, 2.0, "math")
        assert (cfg.optim.lr, cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay) == (
            1e-6, 0.9, 0.98, 0.1,
        )  # fmt: skip
        assert cfg.optim.decay_style == "constant" and cfg.fp8.recipe == "blockwise"
        assert not cfg.fp8.power_of_two_scales and cfg.parallel.tensor == 4
        assert cfg.train.seq_len >= rl.max_prompt_tokens + rl.max_new_tokens
        assert (rl.eval_prompts, rl.eval_every, rl.eval_n, rl.eval_top_p) == ("aime24", 20, 16, 0.7)
