"""Optimizers by kohya name and lr schedules: every lr checked step by step against closed forms."""

from __future__ import annotations

import io
import math
import sys
import warnings

import pytest
import torch

from nbkit.config import ConfigError
from nbkit.train import common
from nbkit.train.optimizers import OPTIMIZER_NAMES, describe_optimizer, make_optimizer, parse_option_args
from nbkit.train.schedules import (
    A1111Schedule,
    CosineAnnealingWarmUpRestarts,
    a1111_schedule,
    is_a1111_schedule,
    make_lr_scheduler,
    required_lr_scheduler,
    resolve_warmup_steps,
    schedule_finished,
)

T, W = 100, 10  # training steps, warm-up steps
OPTIONAL_MODULE = {"Lion": "lion_pytorch", "Prodigy": "prodigyopt"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(jit|Paged optimizers|learning_rate=|lr_scheduler.step).*")
        yield


def sgd(*lrs: float) -> torch.optim.Optimizer:
    """One parameter group per lr; SGD with lr=1.0 makes the lr equal the schedule's factor."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs or (1.0,)]
    return torch.optim.SGD(groups, lr=1.0)


def lrs_used(scheduler, optimizer, steps: int, group: int = 0) -> list[float]:
    """lr[k] = the lr optimizer step k runs with (read from param_groups after k scheduler steps)."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[group]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def schedule(name: str, steps: int = T, opt=None, **options) -> list[float]:
    opt = opt or sgd()
    return lrs_used(make_lr_scheduler(name, opt, num_training_steps=T, **options), opt, steps)


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == pytest.approx(w, rel=1e-9, abs=1e-12), f"step {k}: {g} != {w}"


# ------------------------------------------------------------------ kohya's named schedules


def warm(k: int) -> float:
    return k / W


@pytest.mark.parametrize(
    ("name", "options", "closed_form"),
    [
        ("constant", {}, lambda k: 1.0),
        ("constant_with_warmup", {"lr_warmup_steps": W}, lambda k: warm(k) if k < W else 1.0),
        ("linear", {"lr_warmup_steps": W}, lambda k: warm(k) if k < W else (T - k) / (T - W)),
        ("linear", {"lr_warmup_steps": 0.1}, lambda k: warm(k) if k < W else (T - k) / (T - W)),  # ratio of T
        ("cosine", {"lr_warmup_steps": W},
         lambda k: warm(k) if k < W else 0.5 * (1 + math.cos(math.pi * (k - W) / (T - W)))),
        ("cosine_with_restarts", {"lr_warmup_steps": W, "lr_scheduler_num_cycles": 3},
         lambda k: warm(k) if k < W else 0.5 * (1 + math.cos(math.pi * ((3 * (k - W) / (T - W)) % 1.0)))),
        ("polynomial", {"lr_warmup_steps": W, "lr_scheduler_power": 2.0},
         lambda k: warm(k) if k < W else (1 - 1e-7) * (1 - (k - W) / (T - W)) ** 2 + 1e-7),
        ("cosine_with_min_lr", {"lr_warmup_steps": W, "lr_scheduler_min_lr_ratio": 0.1},
         lambda k: warm(k) if k < W else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - W) / (T - W)))),
        ("inverse_sqrt", {"lr_warmup_steps": W}, lambda k: warm(k) if k < W else math.sqrt(W / k)),
        ("piecewise_constant", {"lr_scheduler_args": ["step_rules=1:10,0.1:20,0.01"]},
         lambda k: 1.0 if k < 10 else 0.1 if k < 20 else 0.01),
        ("torch.optim.lr_scheduler.StepLR", {"lr_scheduler_args": ["step_size=7", "gamma=0.5"]},
         lambda k: 0.5 ** (k // 7)),
    ],
)
def test_named_schedule_matches_closed_form(name, options, closed_form):
    assert_close(schedule(name, **options), [closed_form(k) for k in range(T)])


def test_restarts_really_restart_and_groups_keep_their_ratio():
    lrs = schedule("cosine_with_restarts", lr_warmup_steps=W, lr_scheduler_num_cycles=3)
    starts = [W + 30 * c for c in range(3)]  # (T - W) / 3 = 30 steps per cycle
    assert [lrs[s] for s in starts] == [1.0, 1.0, 1.0]
    assert all(lrs[s - 1] < 0.01 for s in starts[1:])
    opt = sgd(1.0, 0.25)
    scheduler = make_lr_scheduler("cosine", opt, num_training_steps=T, lr_warmup_steps=W)
    for _ in range(37):
        opt.step()
        scheduler.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25 * opt.param_groups[0]["lr"])


def test_warmup_ratio_and_steps():
    assert resolve_warmup_steps(0.05, 1000) == 50
    assert resolve_warmup_steps(50, 1000) == 50
    assert resolve_warmup_steps(50.0, 1000) == 50  # a float >= 1 from TOML is a step count
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        resolve_warmup_steps(-1, 10)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("constant", {"lr_warmup_steps": 5}, "constant_with_warmup"),
        ("cosin", {}, "did you mean cosine"),
        ("cosine_with_min_lr", {}, "lr_scheduler_min_lr_ratio"),
        ("piecewise_constant", {}, "step_rules"),
        ("a1111", {}, "schedule="),
        ("linear", {"lr_scheduler_args": ["bogus=1"]}, "lr_scheduler_args"),
        ("adafactor", {}, "optimizer_type=Adafactor"),
    ],
)
def test_schedule_errors_name_the_option(name, options, message):
    with pytest.raises(ConfigError, match=message):
        make_lr_scheduler(name, sgd(), num_training_steps=T, **options)


# ------------------------------------------------------------------ AUTOMATIC1111 string


def test_a1111_example_string():
    text, max_steps = "5e-5:100, 5e-6:1500, 5e-7", 2000
    assert a1111_schedule(text, max_steps) == [(5e-5, 100), (5e-6, 1500), (5e-7, 2000)]
    opt = sgd(3.0, 7.0)  # A1111 sets every group to the scheduled rate
    scheduler = make_lr_scheduler(text, opt, num_training_steps=max_steps)
    assert isinstance(scheduler, A1111Schedule)
    lrs = lrs_used(scheduler, opt, max_steps)
    want = {0: 5e-5, 99: 5e-5, 100: 5e-6, 1499: 5e-6, 1500: 5e-7, max_steps - 1: 5e-7}
    assert {k: lrs[k] for k in want} == want
    assert opt.param_groups[1]["lr"] == 5e-7
    assert scheduler.finished and schedule_finished(scheduler)  # step 2000 has no pair: A1111 stops


def test_a1111_named_with_args_and_finished_stops_early():
    opt = sgd()
    scheduler = make_lr_scheduler("a1111", opt, num_training_steps=50, lr_scheduler_args=["schedule=1e-3:10, 1e-4:20"])
    lrs = []
    while not schedule_finished(scheduler):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs == [1e-3] * 10 + [1e-4] * 10  # the pairs ran out at step 20, before max_steps=50


@pytest.mark.parametrize(
    ("text", "max_steps", "cur_step", "pairs"),
    [
        ("1e-3:-1, 1e-4:10", 100, 0, [(1e-3, 100)]),  # -1 = until max_steps, ends parsing
        ("1e-3, 1e-4:10", 100, 0, [(1e-3, 100)]),  # a bare rate ends parsing
        ("0.005", 100, 0, [(0.005, 100)]),
        ("1e-3:100, 1e-4:5000, 1e-5", 1000, 0, [(1e-3, 100), (1e-4, 1000)]),  # clamped, then stop
        ("1e-3:1000, 1e-4", 1000, 0, [(1e-3, 1000), (1e-4, 1000)]),  # == max_steps: no stop
        ("5e-5:100, 5e-6:1500, 5e-7", 2000, 500, [(5e-6, 1500), (5e-7, 2000)]),  # resume skips
        ("5e-5:100, 5e-6:1500, 5e-7", 2000, 100, [(5e-6, 1500), (5e-7, 2000)]),  # step <= cur_step skipped
        ("1e-3:10,, 1e-4:20 ,", 100, 0, [(1e-3, 10), (1e-4, 20)]),  # empty items ignored
        ("1e-3:1:2, 1e-4", 100, 0, [(1e-3, 100)]),  # two colons: read as a bare rate, like A1111
    ],
)
def test_a1111_parser_edge_cases(text, max_steps, cur_step, pairs):
    assert a1111_schedule(text, max_steps, cur_step) == pairs


@pytest.mark.parametrize(("text", "cur_step"), [("abc", 0), ("1e-3:x", 0), ("", 0), ("1e-3:100", 200)])
def test_a1111_invalid_strings(text, cur_step):
    with pytest.raises(ConfigError, match="A1111 learning-rate schedule"):
        a1111_schedule(text, 1000, cur_step)


def test_a1111_resume_by_cur_step_and_one_pair_per_step():
    opt = sgd()
    scheduler = A1111Schedule(opt, "5e-5:100, 5e-6:1500, 5e-7", 2000, cur_step=1498)
    assert lrs_used(scheduler, opt, 3) == [5e-6, 5e-6, 5e-7]
    assert scheduler.global_step == 1501
    # A1111 moves one pair per step, so an end step below the previous one lasts exactly one step.
    opt = sgd()
    lrs = lrs_used(A1111Schedule(opt, "1e-3:10, 1e-4:5, 1e-5", 100), opt, 13)
    assert lrs == [1e-3] * 10 + [1e-4, 1e-5, 1e-5]


def test_a1111_detection():
    assert is_a1111_schedule("5e-5:100, 5e-6:1500, 5e-7") and is_a1111_schedule("1e-4")
    assert not is_a1111_schedule("cosine") and not is_a1111_schedule("linear") and not is_a1111_schedule("e")


# ------------------------------------------------------------------ hypernetwork extension schedule


def test_warm_restarts_hand_computed():
    opt = sgd()
    scheduler = CosineAnnealingWarmUpRestarts(opt, first_cycle_steps=10, max_lr=1.0, min_lr=0.1, warmup_steps=2,
                                              gamma=0.5)
    lrs = lrs_used(scheduler, opt, 30)
    cos_part = lambda s, peak: 0.1 + (peak - 0.1) * (1 + math.cos(math.pi * (s - 2) / 8)) / 2  # noqa: E731
    want = {0: 0.1, 1: 0.55, 2: 1.0, 6: 0.55, 9: cos_part(9, 1.0), 10: 0.1, 11: 0.3, 12: 0.5, 15: cos_part(5, 0.5),
            20: 0.1, 22: 0.25}
    assert_close([lrs[k] for k in want], list(want.values()))
    assert min(lrs) == pytest.approx(0.1)
    assert scheduler.is_end_of_cycle(9) and not scheduler.is_end_of_cycle(8) and scheduler.is_end_of_cycle(29)


def test_warm_restarts_cycle_mult_and_group_peaks():
    opt = sgd(1.0, 0.5)  # max_lr=None: each group's own lr is its peak
    scheduler = CosineAnnealingWarmUpRestarts(opt, first_cycle_steps=10, cycle_mult=2.0, min_lr=0.0, warmup_steps=2)
    lrs = lrs_used(scheduler, opt, 75)
    assert [lrs[k] for k in (0, 2, 10, 12, 30, 32, 70, 72)] == pytest.approx([0, 1, 0, 1, 0, 1, 0, 1])
    # cycle 1 is steps 10..29 (20 steps): cosine over 18 steps after the 2 warm-up steps
    assert lrs[20] == pytest.approx((1 + math.cos(math.pi * 8 / 18)) / 2)
    assert lrs[69] == pytest.approx((1 + math.cos(math.pi * 37 / 38)) / 2)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr"])
    assert [k for k in range(75) if scheduler.is_end_of_cycle(k)] == [9, 29, 69]


def test_warm_restarts_from_factory_and_errors():
    args = ["first_cycle_steps=10", "warmup_steps=2", "min_lr=0.1", "gamma=0.5", "max_lr=1.0"]
    via_factory = schedule("cosine_annealing_warm_restarts", 30, lr_scheduler_args=args)
    opt = sgd()
    direct = lrs_used(CosineAnnealingWarmUpRestarts(opt, 10, max_lr=1.0, min_lr=0.1, warmup_steps=2, gamma=0.5), opt, 30)
    assert via_factory == direct
    # defaults: one cycle per lr_scheduler_num_cycles, warm-up from lr_warmup_steps, min_lr from the ratio
    lrs = schedule("cosine_annealing_warm_restarts", T, lr_scheduler_num_cycles=2, lr_warmup_steps=5,
                   lr_scheduler_min_lr_ratio=0.1)
    assert [lrs[k] for k in (0, 5, 50, 55)] == pytest.approx([0.1, 1.0, 0.1, 1.0])
    with pytest.raises(ConfigError, match="warmup_steps"):
        CosineAnnealingWarmUpRestarts(sgd(), first_cycle_steps=10, warmup_steps=10)
    with pytest.raises(ConfigError, match="cycle_mult"):
        CosineAnnealingWarmUpRestarts(sgd(), first_cycle_steps=10, cycle_mult=0.5)


# ------------------------------------------------------------------ resume


RESUMABLE = [
    ("constant_with_warmup", {"lr_warmup_steps": W}),
    ("linear", {"lr_warmup_steps": 0.1}),
    ("cosine", {"lr_warmup_steps": W}),
    ("cosine_with_restarts", {"lr_warmup_steps": W, "lr_scheduler_num_cycles": 3}),
    ("polynomial", {"lr_warmup_steps": W, "lr_scheduler_power": 2.0}),
    ("cosine_with_min_lr", {"lr_warmup_steps": W, "lr_scheduler_min_lr_ratio": 0.1}),
    ("inverse_sqrt", {"lr_warmup_steps": W}),
    ("piecewise_constant", {"lr_scheduler_args": ["step_rules=1:10,0.1:20,0.01"]}),
    ("1e-3:15, 1e-4:40, 1e-5", {}),
    ("cosine_annealing_warm_restarts",
     {"lr_scheduler_args": ["first_cycle_steps=20", "warmup_steps=3", "cycle_mult=1.5", "gamma=0.7", "min_lr=0.01"]}),
]


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize(("name", "options"), RESUMABLE, ids=[r[0] for r in RESUMABLE])
@pytest.mark.parametrize("split", [7, 12, 33])
def test_state_dict_resume_continues_identically(name, options, split):
    whole = schedule(name, 60, **options)
    opt = sgd()
    scheduler = make_lr_scheduler(name, opt, num_training_steps=T, **options)
    first = lrs_used(scheduler, opt, split)
    opt_state, sched_state = roundtrip(opt.state_dict()), roundtrip(scheduler.state_dict())
    opt2 = sgd()
    scheduler2 = make_lr_scheduler(name, opt2, num_training_steps=T, **options)
    opt2.load_state_dict(opt_state)
    scheduler2.load_state_dict(sched_state)
    assert first + lrs_used(scheduler2, opt2, 60 - split) == whole


@pytest.mark.parametrize("name", ["1e-3:15, 1e-4:40, 1e-5", "cosine_annealing_warm_restarts"])
def test_own_schedules_resume_from_scheduler_state_alone(name):
    whole = schedule(name, 60)
    opt = sgd()
    scheduler = make_lr_scheduler(name, opt, num_training_steps=T)
    first = lrs_used(scheduler, opt, 20)
    opt2 = sgd()
    scheduler2 = make_lr_scheduler(name, opt2, num_training_steps=T)
    scheduler2.load_state_dict(roundtrip(scheduler.state_dict()))
    assert first + lrs_used(scheduler2, opt2, 40) == whole


# ------------------------------------------------------------------ optimizers


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))  # 4096 weights: 8-bit state


def take_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module, scheduler=None) -> None:
    """One training step in the trainer's order: step, schedule, zero_grad."""
    model(torch.randn(8, 64)).pow(2).mean().backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_in_the_table_steps(name):
    module = OPTIONAL_MODULE.get(name) or ("dadaptation" if name.startswith("DAdapt") else None)
    if module:
        pytest.importorskip(module)
    model = tiny_model()
    lr = 1.0 if name.startswith(("DAdapt", "Prodigy")) else 1e-3
    optimizer = make_optimizer(name.upper() if name == "AdamW" else name.lower(), [{"params": model.parameters()}], lr)
    before = [p.detach().clone() for p in model.parameters()]
    take_step(optimizer, model)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    if name in ("AdamW8bit", "Lion8bit", "SGDNesterov8bit", "PagedAdamW8bit"):
        state = optimizer.state[model[0].weight]
        assert state["state1"].dtype == torch.uint8  # really 8-bit, on the CPU


def test_optimizer_args_reach_the_optimizer():
    model = tiny_model()
    args = ["betas=(0.9,0.99)", "weight_decay=0.05", "eps=1e-6"]
    optimizer = make_optimizer("AdamW8bit", [{"params": model.parameters()}], 2e-4, args)
    assert optimizer.defaults["betas"] == (0.9, 0.99) and optimizer.defaults["weight_decay"] == 0.05
    assert optimizer.defaults["eps"] == 1e-6
    assert describe_optimizer(optimizer) == "bitsandbytes.optim.adamw.AdamW8bit(betas=(0.9, 0.99),weight_decay=0.05,eps=1e-06)"
    sgd_n = make_optimizer("SGDNesterov", model.parameters(), 0.1)
    assert sgd_n.defaults["momentum"] == 0.9 and sgd_n.defaults["nesterov"] is True
    assert describe_optimizer(sgd_n) == "torch.optim.sgd.SGD(momentum=0.9)"  # as kohya's ss_optimizer
    sgd8 = make_optimizer("sgdnesterov8bit", model.parameters(), 0.1, ["momentum=0.8"])
    assert sgd8.defaults["betas"][0] == 0.8  # bitsandbytes keeps momentum in betas (and ignores nesterov)
    assert describe_optimizer(make_optimizer("AdamW", model.parameters(), 1e-3)) == "torch.optim.adamw.AdamW"
    assert describe_optimizer(torch.optim.AdamW(model.parameters(), weight_decay=0.1)) == "torch.optim.adamw.AdamW(weight_decay=0.1)"


def test_parse_option_args():
    parsed = parse_option_args(["a=1", "b=(1, 2.5)", "c=True", "d='x=y'", "e=none", " f = 3e-4 "], "optimizer_args")
    assert parsed == {"a": 1, "b": (1, 2.5), "c": True, "d": "x=y", "e": None, "f": 3e-4}
    assert parse_option_args({"a": 1}, "x") == {"a": 1} and parse_option_args(None, "x") == {}
    assert parse_option_args(["schedule=1e-3:10, 1e-4"], "x", raw_keys=["schedule"]) == {"schedule": "1e-3:10, 1e-4"}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_option_args(["weight_decay"], "optimizer_args")
    with pytest.raises(ConfigError, match="decouple='yes'"):
        parse_option_args(["decouple=yes"], "optimizer_args")


def test_bad_optimizer_args_and_names():
    model = tiny_model()
    with pytest.raises(ConfigError, match="optimizer_type=AdamW8bit.*accepts.*weight_decay"):
        make_optimizer("AdamW8bit", model.parameters(), 1e-3, ["wieght_decay=0.1"])
    with pytest.raises(ConfigError, match="did you mean AdamW8bit"):
        make_optimizer("AdamW8bitt", model.parameters(), 1e-3)
    with pytest.raises(ConfigError, match="cannot import"):
        make_optimizer("no_such_package.Optim", model.parameters(), 1e-3)


def test_module_class_paths():
    model = tiny_model()
    assert isinstance(make_optimizer("torch.optim.RAdam", model.parameters(), 1e-3, ["decoupled_weight_decay=True"]),
                      torch.optim.RAdam)
    optimizer = make_optimizer("Adagrad", model.parameters(), 1e-2)  # a bare name is looked up in torch.optim
    assert isinstance(optimizer, torch.optim.Adagrad)
    take_step(optimizer, model)


@pytest.mark.parametrize(
    ("name", "module", "install"),
    [
        ("Prodigy", "prodigyopt", "pip install 'prodigyopt'"),
        ("Lion", "lion_pytorch", "pip install 'lion-pytorch'"),
        ("DAdaptAdam", "dadaptation", "pip install 'dadaptation'"),
        ("DAdaptation", "dadaptation.experimental", "pip install 'dadaptation'"),
        ("AdamW8bit", "bitsandbytes.optim", "pip install 'bitsandbytes>=0.50'"),
    ],
)
def test_missing_package_says_what_to_install(monkeypatch, name, module, install):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ConfigError) as info:
        make_optimizer(name, tiny_model().parameters(), 1.0)
    assert f"optimizer_type={name}" in str(info.value) and install in str(info.value)
    if name != "AdamW8bit":
        assert "nbkit[optimizers]" in str(info.value)


def test_adafactor_relative_step_couples_to_its_schedule():
    model = tiny_model()
    groups = [{"params": list(model[0].parameters()), "lr": 1e-4}, {"params": list(model[1].parameters())}]
    with pytest.warns(UserWarning, match="ignores the group learning rates"):
        optimizer = make_optimizer("Adafactor", groups, 1e-3)
    assert groups[0]["lr"] == 1e-4  # the caller's groups are not changed
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["lr"] is None
    assert required_lr_scheduler(optimizer) == "adafactor"
    with pytest.raises(ConfigError, match=r"lr_scheduler=adafactor.*relative_step=False"):
        make_lr_scheduler("constant", optimizer, num_training_steps=T)
    scheduler = make_lr_scheduler("adafactor:1e-3", optimizer, num_training_steps=T)
    assert scheduler.get_last_lr()[0] == 1e-3  # initial_lr, reported before the first step
    weight = model[0].weight
    for step in range(1, 6):
        rms = weight.detach().pow(2).mean().sqrt().item()  # Adafactor scales by the RMS before its update
        take_step(optimizer, model, scheduler)
        want = min(1e-2, 1 / math.sqrt(step)) * max(1e-3, rms)
        assert scheduler.get_last_lr()[0] == pytest.approx(want, rel=1e-5)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-5)


def test_adafactor_with_a_fixed_lr():
    model = tiny_model()
    args = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
    optimizer = make_optimizer("adafactor", model.parameters(), 1e-4, args)
    assert optimizer.defaults["lr"] == 1e-4 and required_lr_scheduler(optimizer) is None
    assert describe_optimizer(optimizer) == ("transformers.optimization.Adafactor"
                                             "(scale_parameter=False,relative_step=False,warmup_init=False)")
    assert schedule("constant_with_warmup", 3, opt=optimizer, lr_warmup_steps=2) == [0.0, 5e-5, 1e-4]
    with pytest.warns(UserWarning, match="warmup_init=True needs relative_step=True"):
        forced = make_optimizer("Adafactor", model.parameters(), 1e-3, ["relative_step=False", "warmup_init=True"])
    assert forced.defaults["relative_step"] is True


def test_adaptive_optimizers_warn_about_small_lr():
    pytest.importorskip("prodigyopt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = make_optimizer("Prodigy", tiny_model().parameters(), 1e-4, ["d_coef=2.0", "decouple=True"])
    assert any("expect about 1.0" in str(w.message) for w in caught)
    assert optimizer.defaults["d_coef"] == 2.0 and optimizer.defaults["decouple"] is True


def test_common_wrappers_delegate():
    model = tiny_model()
    optimizer = common.make_optimizer("AdamW", [{"params": model.parameters()}], 1.0, ["weight_decay=0.0"])
    assert optimizer.defaults["weight_decay"] == 0.0
    scheduler = common.make_lr_scheduler("cosine_with_restarts", optimizer, W, T, lr_scheduler_num_cycles=3)
    assert_close(lrs_used(scheduler, optimizer, T),
                 schedule("cosine_with_restarts", lr_warmup_steps=W, lr_scheduler_num_cycles=3))
