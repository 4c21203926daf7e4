"""The loss-spike remedy carried in lemon_schedule.json (``remedy``) and its helpers in
``lemon_onnx.handoff.schedule``; the benchmark's ``--quick`` run asserts the no-spike bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lemon_onnx.handoff.schedule import (advice, load, lr_factor, lr_factors, param_groups,
                                         remedy, remedy_horizon, remedy_lr_factor, remedy_warmup,
                                         scheduler, steps_for, warm_start)
from conftest import ROOT

PLAN = {"source": {"hidden": 64, "heads": 4, "head_dim": 16, "kv_heads": 2, "ffn": 176,
                   "layers": 2},
        "target": {"hidden": 128, "heads": 8, "head_dim": 16, "kv_heads": 4, "ffn": 528,
                   "layers": 4}}


def _t(name, shape, *keys):
    return {"name": name, "shape": list(shape), "from": [{"key": k, "form": "transposed"}
                                                         for k in keys]}


def test_factors_follow_each_weights_input_axis():
    tensors = [
        _t("q", (128, 128), "blocks[0].attention.q.node@1"),          # reads hidden: 64/128
        _t("o", (128, 128), "blocks[2].attention.out.node@1"),        # reads heads x head_dim
        _t("down", (128, 528), "blocks[1].mlp.down.node@1"),          # reads ffn: 176/528
        _t("up", (528, 128), "blocks[1].mlp.up.node@1"),
        _t("emb", (256, 128), "embeddings.token"),                    # one-hot input: 1
        _t("tied", (256, 128), "embeddings.token", "head.linear.node@1"),  # smallest: 1/2
        _t("bias", (128,), "blocks[0].attention.out.bias"),           # vectors: 1
        _t("qkv_b", (384,), "blocks[0].attention.qkv.bias"),
    ]
    f = lr_factors(PLAN, tensors)
    assert f == {"q": 0.5, "o": 0.5, "down": round(176 / 528, 6), "up": 0.5, "tied": 0.5}
    assert lr_factors(None, tensors) == {}
    same = {"source": PLAN["source"], "target": dict(PLAN["source"], layers=4)}
    assert lr_factors(same, tensors) == {}  # depth only: nothing is copied side by side
    r = advice(PLAN, [], tensors)["remedy"]
    assert r == remedy(PLAN, tensors) and r["lr_factors"] == f
    assert r["adam_warm_start_steps"] >= 0 and 0 < r["peak_lr_relative_to_scratch_best"] <= 1
    json.dumps(r)


def _tiny():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 8)
            self.a = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 11, bias=False)
            self.head.weight = self.emb.weight  # tied: one parameter, one group

        def forward(self, input_ids, labels):
            h = self.head(torch.tanh(self.a(self.emb(input_ids))))
            loss = torch.nn.functional.cross_entropy(h[:, :-1].reshape(-1, 11),
                                                     labels[:, 1:].reshape(-1))
            return type("Out", (), {"loss": loss})()

    return torch, Tiny()


def test_param_groups_scale_the_rate_and_warm_start_moves_nothing(tmp_path):
    torch, model = _tiny()
    sched = {"remedy": {"lr_factors": {"a.weight": 0.5, "emb.weight": 0.25},
                        "adam_warm_start_steps": 4}}
    (tmp_path / "lemon_schedule.json").write_text(json.dumps(sched))
    assert load(tmp_path) == load(tmp_path / "lemon_schedule.json") == sched
    groups = param_groups(model, tmp_path, 1e-2, weight_decay=0.1)
    got = {g["lemon_lr_factor"]: (g["lr"], sorted(id(p) for p in g["params"]))
           for g in groups}
    assert got == {1.0: (1e-2, [id(model.a.bias)]), 0.5: (5e-3, [id(model.a.weight)]),
                   0.25: (2.5e-3, [id(model.emb.weight)])}
    assert all(g["weight_decay"] == 0.1 for g in groups)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 11, (3, 6), generator=gen) for _ in range(10)]
    assert warm_start(model, opt, iter(batches), schedule=sched) == 4
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # lr 0: AdamW's decay is lr x wd = 0 as well
    for p in model.parameters():
        st = opt.state[p]
        assert float(st["step"]) == 4 and float(st["exp_avg_sq"].sum()) > 0
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 5e-3, 2.5e-3]  # restored
    # dict batches (a Trainer's data loader) and a loss function work too
    assert warm_start(model, opt, [{"input_ids": b, "labels": b} for b in batches], 2) == 2
    assert warm_start(model, opt, batches, 1,
                      loss=lambda m, b: m(input_ids=b, labels=b).loss) == 1
    assert float(opt.state[model.a.weight]["step"]) == 7
    # the first real update is m/sqrt(v) of measured statistics, not a sign-sized step
    loss = model(input_ids=batches[0], labels=batches[0]).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    moved = (model.a.weight - before["a.weight"]).abs().max().item()
    assert 0 < moved < 5e-3


@pytest.mark.slow
def test_the_quick_payoff_run_keeps_the_inherited_loss(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # one thread: the suite runs one pytest worker per core beside it; the timeout only
    # guards against a hang (76 s on an idle machine, 600 s was exceeded on a loaded one)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_payoff.py"),
                        "--quick", "--threads", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    (run,) = res["runs"]
    assert run["handoff"]["verify_passed"]
    assert run["handoff"]["val_loss_handed_off"] == pytest.approx(
        run["handoff"]["val_loss_small"], rel=1e-4)
    rem = next(e for e in run["expanded"] if e["variant"] == "remedy")
    assert rem["rises"]["rise_first_steps"] <= 0.05
    # the remedy's peak is the stated fraction of the scratch-best rate, its run the stated
    # fraction of scratch's steps (the quick run: 200 -> 100)
    sched = run["schedule"]["remedy"]
    assert rem["peak_lr"] == pytest.approx(run["scratch_best_lr"] *
                                           sched["peak_lr_relative_to_scratch_best"])
    assert rem["steps"] == run["schedule"]["remedy_horizon"] == round(
        res["settings"]["scratch_steps"] * sched["horizon_fraction_of_scratch"])
    assert res["summary"]["gpt2"]["remedy"]["no_spike_all_seeds"]


@pytest.mark.slow
def test_the_payoff_run_trains_architectures_side_by_side_and_flags_a_sunk_target(tmp_path):
    """Two architectures x two seeds as four processes, two at a time (--jobs 2), merged into
    one results.json; the second seed trains from scratch at the first one's best rate.  At
    these tiny sizes the small model ends below the 4 x 128's 60-step scratch loss, which the
    run must flag instead of passing the sunk cost off as the expansion's saving."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_payoff.py"),
                        "--archs", "gpt2,llama", "--jobs", "2", "--threads", "1",
                        "--seeds", "3,4", "--small-steps", "300", "--scratch-steps", "60",
                        "--scratch-lrs", "3e-3,6e-3",
                        "--corpus-mb", "0.5", "--val-windows", "16", "--eval-every", "20",
                        "--early-eval-every", "10", "--early-steps", "20",
                        "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(run["arch"], run["seed"]) for run in res["runs"]] == [
        ("gpt2", 3), ("gpt2", 4), ("llama", 3), ("llama", 4)]
    assert set(res["summary"]) == {"gpt2", "llama"}
    assert set(res["seconds_per_process"]) == {"gpt2-3", "gpt2-4", "llama-3", "llama-4"}
    for arch in ("gpt2", "llama"):  # each process wrote its own part, read back here
        first, second = (json.loads((tmp_path / f"part-{arch}-{s}" / "results.json").read_text())
                         for s in (3, 4))
        assert first["torch_threads"] == second["torch_threads"] == 1
        swept = first["runs"][0]["scratch"]
        assert sorted(x["peak_lr"] for x in swept) == [3e-3, 6e-3]
        (alone,) = second["runs"][0]["scratch"]  # no sweep: the first seed's best rate
        assert alone["peak_lr"] == first["runs"][0]["scratch_best_lr"] == min(
            swept, key=lambda x: x["final"])["peak_lr"]
    for run in res["runs"]:
        assert run["handoff"]["verify_passed"]
        sunk = run["handoff"]["val_loss_small"] <= run["target_val_loss"]
        assert sunk, "the tiny run was meant to end below its target"
        assert run["small_at_or_below_target"] is True
        pace = run["scratch_equal_pace"]  # scratch's way from the handed-off loss
        assert set(pace) == {"scratch_at_start_loss", "scratch_steps_from_start_loss",
                             "equal_pace_saving"}
        assert res["summary"][run["arch"]]["seeds_small_at_or_below_target"] == [3, 4]
    assert "already starts at or below the target" in r.stdout


def test_a_trainer_keeps_the_factors_and_warm_starts(tmp_path):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lemon_onnx.handoff.schedule import optimizer, trainer_callback

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=32, n_positions=8, n_embd=16,
                                             n_layer=1, n_head=2, use_cache=False))
    sched = {"remedy": {"lr_factors": {"transformer.h.0.mlp.c_fc.weight": 0.5},
                        "adam_warm_start_steps": 3}}
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 32, (12, 8), generator=gen)]
    opt = optimizer(model, sched, 1e-3)
    args = tf.TrainingArguments(str(tmp_path / "run"), max_steps=2, warmup_steps=0,
                                lr_scheduler_type="constant", per_device_train_batch_size=2,
                                report_to="none", save_strategy="no", use_cpu=True,
                                max_grad_norm=1.0)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                         callbacks=[trainer_callback(sched)])
    trainer.train()
    w = model.transformer.h[0].mlp.c_fc.weight
    assert float(opt.state[w]["step"]) == 3 + 2  # warm start, then the two training steps
    lrs = {g["lemon_lr_factor"]: g["lr"] for g in opt.param_groups}
    assert lrs == {1.0: pytest.approx(1e-3), 0.5: pytest.approx(5e-4)}


def test_the_remedys_rate_warms_up_and_keeps_or_ramps_the_factors():
    torch, model = _tiny()
    sched = {"remedy": {"lr_factors": {"a.weight": 0.5}, "warmup_steps": 200,
                        "lr_factor_hold_steps": None, "lr_factor_ramp_steps": 0}}
    assert remedy_warmup(sched, 1000) == 200 and remedy_warmup(sched, 100) == 50  # <= half
    f = [remedy_lr_factor(s, 1000, sched) for s in range(1001)]
    assert f[0] == pytest.approx(1 / 200) and f[199] == 1.0 and f[-1] == 0.0
    assert f == [lr_factor(s, 1000, 200) for s in range(1001)]
    assert remedy_lr_factor(500, 1000, sched, 0.5) == pytest.approx(0.5 * f[500])  # held
    ramp = {"remedy": dict(sched["remedy"], lr_factor_hold_steps=300, lr_factor_ramp_steps=100)}
    assert remedy_lr_factor(299, 1000, ramp, 0.5) == pytest.approx(0.5 * f[299])
    assert remedy_lr_factor(350, 1000, ramp, 0.5) == pytest.approx(0.75 * f[350])
    assert remedy_lr_factor(400, 1000, ramp, 0.5) == pytest.approx(f[400])
    opt = torch.optim.AdamW(param_groups(model, sched, 1e-2))
    lr = scheduler(opt, sched, 1000)
    for step in range(3):
        opt.step()
        lr.step()
    assert {g["lemon_lr_factor"]: g["lr"] for g in opt.param_groups} == {
        1.0: pytest.approx(1e-2 * f[3]), 0.5: pytest.approx(0.5e-2 * f[3])}
    r = remedy(PLAN, [])
    assert r["peak_lr_relative_to_scratch_best"] == 0.5 and r["warmup_steps"] > 0
    # the remedy's run is its own fraction of the scratch run; the plain schedule's without one
    assert remedy_horizon({"remedy": dict(r, horizon_fraction_of_scratch=1 / 3)}, 3000) == 1000
    assert remedy_horizon({"remedy": r}, 3000) == remedy_horizon({"remedy": {}}, 3000) == \
        steps_for(3000)[0] == 1500


def test_the_readmes_remedy_loop_runs(tmp_path):
    """The README's remedy loop ("Keeping the inherited loss") on a saved model and a
    lemon_schedule.json: factors, warm start, the remedy's warmup."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from conftest import ROOT as root

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=32, n_positions=8, n_embd=16,
                                             n_layer=1, n_head=2, use_cache=False))
    model.save_pretrained(tmp_path)
    sched = {"remedy": remedy(PLAN, [])}
    sched["remedy"]["lr_factors"] = {"transformer.h.0.mlp.c_fc.weight": 0.5}
    (tmp_path / "lemon_schedule.json").write_text(json.dumps(sched))
    text = (root / "README.md").read_text()
    start = text.index("```python", text.index("In a PyTorch loop (`DIR`")) + len("```python")
    code = text[start:text.index("```", start)].replace('"DIR', f'"{tmp_path}')
    gen = torch.Generator().manual_seed(0)
    scope = {"batches": [torch.randint(0, 32, (2, 8), generator=gen) for _ in range(3)]}
    exec(code, scope)
    horizon, peak, opt = scope["horizon"], scope["peak_lr"], scope["opt"]
    assert (horizon, peak) == (1500, 1.5e-3)
    for g in opt.param_groups:  # three steps into the remedy's warmup, each group's factor kept
        assert g["lr"] == pytest.approx(peak * g["lemon_lr_factor"] *
                                        lr_factor(3, horizon, remedy_warmup(sched, horizon)))
    assert {g["lemon_lr_factor"] for g in opt.param_groups} == {1.0, 0.5}


def test_the_resplit_probe_keeps_the_function_and_splits_copies_per_element():
    """benchmarks/payoff_probes.py's ``resplit``: the fan-out rows of copied MLP units get
    per-element shares of their sum, so the model computes the same and a copy's rows are no
    longer one share times the source row (which makes Adam move the copies alike)."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import payoff_probes as pp

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, n_inner=8)
    m = tf.GPT2LMHeadModel(cfg).eval()
    mlp = m.transformer.h[0].mlp
    with torch.no_grad():  # units 4..7 copy units 0..3, their fan-out rows split 1/4 : 3/4
        mlp.c_fc.weight[:, 4:] = mlp.c_fc.weight[:, :4]
        mlp.c_fc.bias[4:] = mlp.c_fc.bias[:4]
        mlp.c_proj.weight[4:] = 0.75 * mlp.c_proj.weight[:4]
        mlp.c_proj.weight[:4] *= 0.25
    x = torch.randint(0, 50, (2, 8))
    before = m(input_ids=x).logits
    rows_before = mlp.c_proj.weight.detach().clone()
    assert pp.resplit_mlp(m, "gpt2", seed=0) == 4
    after = m(input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-5)
    w = mlp.c_proj.weight.detach()
    assert torch.allclose(w[:4] + w[4:], rows_before[:4] + rows_before[4:], atol=1e-6)
    ratio = w[:4] / (w[:4] + w[4:])  # one share per row before, per element now
    assert (ratio.std(dim=1) > 0.05).all()


def test_equal_pace_counts_scratchs_own_steps_from_the_handed_off_loss():
    """The benchmark's bound: where scratch's curve first reaches the loss a hand-off starts
    at, and what is left of scratch's way from there to its best loss."""
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import training_payoff as tp

    run = {"curve": [(0, 5.0, 0.0), (100, 2.0, 1.0), (200, 1.6, 2.0), (300, 1.5, 3.0),
                     (400, 1.45, 4.0)]}
    got = tp.equal_pace(run, 1.6, 400)  # at 1.6 on step 200: 200 of 400 left
    assert got == {"scratch_at_start_loss": 200, "scratch_steps_from_start_loss": 200,
                   "equal_pace_saving": 0.5}
    assert tp.equal_pace(run, 1.55, 400)["scratch_at_start_loss"] == 300  # first at or below
    never = tp.equal_pace(run, 1.4, 400)  # below anything scratch reached
    assert never["scratch_at_start_loss"] is None and never["equal_pace_saving"] is None


def test_report_again_fills_the_summary_from_a_recorded_run(tmp_path):
    """``--report`` recomputes an existing results.json's summary from its runs (the committed
    full run), and its equal-pace figures agree with the recorded curves."""
    pytest.importorskip("torch")
    src = ROOT / "benchmarks" / "payoff" / "results.json"
    path = tmp_path / "results.json"
    recorded = json.loads(src.read_text())
    for a in recorded["summary"].values():  # as a results.json written before the field
        a.pop("equal_pace_saving", None)
    path.write_text(json.dumps(recorded))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_payoff.py"),
                        "--report", str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(path.read_text())
    assert "a hand-off going down at scratch's pace saves" in r.stdout
    for arch, a in res["summary"].items():
        savings = []
        for run in (x for x in res["runs"] if x["arch"] == arch):
            best = next(s for s in run["scratch"] if s["peak_lr"] == run["scratch_best_lr"])
            start = run["handoff"]["val_loss_handed_off"]
            steps = [s for s, v, _ in best["curve"] if v <= start]
            before = [v for s, v, _ in best["curve"] if s < steps[0]]
            assert all(v > start for v in before)
            to = run["scratch_reach"]["step"]
            savings.append(steps[0] / to)
        assert a["equal_pace_saving"]["mean"] == pytest.approx(sum(savings) / len(savings))
        assert a["equal_pace_saving"]["n"] == len(savings) == 3
    r2 = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training_payoff.py"),
                         "--report", str(tmp_path / "missing.json")],
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode != 0 and "is not a file" in r2.stderr + r2.stdout


def test_the_anneal_probe_follows_scratch_to_its_cut_then_anneals():
    """benchmarks/payoff_probes.py's ``anneal``: up to the cut it is the benchmark's scratch
    run, step for step (same seed, data and rate), and from there its own rate (going to 0)
    takes it elsewhere."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import payoff_probes as pp
    import training_payoff as tp

    torch.set_num_threads(1)
    tr, va = tp.corpus(0.3)
    data = tp.Batches(tr, va, 8, 32, 5, 16)
    large = tf.GPT2LMHeadModel(tp.gpt2_config(32, 2, 2, 32))
    got = pp.anneal_scratch(large, data, seed=5, cut=40, anneal_steps=20, target=0.0,
                            scratch_steps=120, lr=6e-3)
    torch.manual_seed(5)
    uncut = tp.train(type(large)(large.config), data, steps=60, peak_lr=6e-3, horizon=120,
                     warmup=6, eval_every=20, label="scratch")
    assert [(s, round(v, 5)) for s, v, _ in uncut["curve"][:3]] == [
        tuple(c) for c in got["curve"][:3]]  # steps 0, 20, 40
    assert got["loss_at_cut"] == uncut["curve"][2][1]
    assert 0 < got["rate_at_cut"] < 1
    assert got["steps"] == 60 and got["curve"][-1][0] == 60
    assert got["annealed"] != uncut["curve"][3][1]  # step 60: annealed, against still at rate
