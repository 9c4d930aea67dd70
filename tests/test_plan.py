"""Matrix expansion: counts, stable ids, axis values, duplicate ids."""
from __future__ import annotations

import textwrap

import pytest

from orchestrator.config import parse_config
from orchestrator.config.plan import Job, expand, slug
from orchestrator.errors import ConfigError

TEXT = textwrap.dedent("""\
    name: m
    defaults: {steps: 100}
    hosts:
      here: {provider: local}
      box: {provider: ssh, host: 127.0.0.1, gpu: RTX 4090, price_per_hour: 1.88, currency: CNY}
    datasets:
      demo: {generate: {size: 24}}
      synth: {mirrors: ["file:///data/nerf_synthetic"], scenes: [lego, chair, hotdog]}
    experiments:
      - name: grid
        dataset: demo
        scenes: [default, rods]
        hosts: [here, box]
        steps: [10, 20, 30]
        backend: [auto, torch]
      - name: cap
        dataset: synth
        hosts: [box]
        max_seconds: [60, 90.5, null]
        downscale: 2
    """)


def test_matrix_counts_ids_and_values() -> None:
    jobs = expand(parse_config(TEXT))
    grid = [j for j in jobs if j.experiment == "grid"]
    cap = [j for j in jobs if j.experiment == "cap"]
    assert len(grid) == 2 * 2 * 3 * 2 and len(cap) == 3 * 1 * 3
    assert len({j.job_id for j in jobs}) == len(jobs)
    # File order: scene, host, then the axes in settings order (steps before backend).
    assert [j.job_id for j in grid[:4]] == [
        "grid-default-here-steps10-backendauto", "grid-default-here-steps10-backendtorch",
        "grid-default-here-steps20-backendauto", "grid-default-here-steps20-backendtorch"]
    j = next(j for j in grid if j.job_id == "grid-rods-box-steps30-backendtorch")
    assert (j.scene, j.host.name, j.host.gpu, j.steps, j.backend, j.dataset.name) == \
        ("rods", "box", "RTX 4090", 30, "torch", "demo")
    assert dict(j.settings) == {"steps": 30, "backend": "torch"}
    assert [c.job_id for c in cap[:3]] == ["cap-lego-box-max_seconds60", "cap-lego-box-max_seconds90.5",
                                           "cap-lego-box-max_secondsnone"]
    assert [c.max_seconds for c in cap[:3]] == [60.0, 90.5, None]
    assert all(c.steps == 100 and c.downscale == 2 for c in cap)       # from defaults / scalar
    assert {c.scene for c in cap} == {"lego", "chair", "hotdog"}


def test_ids_are_stable_across_loads() -> None:
    assert [j.job_id for j in expand(parse_config(TEXT))] == [j.job_id for j in expand(parse_config(TEXT))]


def test_scalar_settings_add_nothing_to_the_id() -> None:
    text = TEXT.replace("steps: [10, 20, 30]", "steps: 10").replace("backend: [auto, torch]", "backend: torch")
    grid = [j for j in expand(parse_config(text)) if j.experiment == "grid"]
    assert [j.job_id for j in grid] == ["grid-default-here", "grid-default-box", "grid-rods-here", "grid-rods-box"]
    assert all(dict(j.settings) == {} and j.backend == "torch" for j in grid)


def test_defaults_list_is_an_axis_for_every_experiment() -> None:
    text = TEXT.replace("defaults: {steps: 100}", "defaults: {steps: 100, seed: [1, 2]}")
    jobs = expand(parse_config(text))
    assert len(jobs) == (24 + 9) * 2
    assert "cap-lego-box-max_seconds60-seed2" in {j.job_id for j in jobs}


def test_duplicate_job_ids_are_refused() -> None:
    text = textwrap.dedent("""\
        name: d
        datasets:
          s: {mirrors: ["https://example.invalid/x.zip"], scenes: [b-c, c]}
        experiments:
          - {name: a, scenes: [b-c], steps: 5}
          - {name: a-b, scenes: [c], steps: 5}
        """)
    with pytest.raises(ConfigError) as info:
        expand(parse_config(text, "dup.yaml"))
    assert str(info.value) == ("dup.yaml:6: experiments[1]: two jobs get the same id 'a-b-c-local' "
                               "(from experiments 'a' and 'a-b')")


def test_slug_and_as_dict() -> None:
    assert [slug(v) for v in (30000, 0.5, 1e-3, None, "a b/c", "")] == ["30000", "0.5", "0.001", "none", "a-b-c", "x"]
    j = expand(parse_config(TEXT))[0]
    assert isinstance(j, Job)
    assert j.as_dict() == {"job_id": "grid-default-here-steps10-backendauto", "experiment": "grid",
                           "scene": "default", "host": "here", "provider": "local", "gpu": "cpu",
                           "dataset": "demo", "steps": 10, "backend": "auto", "device": "auto",
                           "max_seconds": None, "downscale": 1, "seed": 0,
                           "settings": {"steps": 10, "backend": "auto"}, "train": {}}


def test_train_options_are_matrix_axes_and_reach_the_payload() -> None:
    """`train:` sets TrainConfig fields; a list is another axis (in the job id, in the job's
    settings) and every job carries its own values to `remote_payload run --train-option`."""
    from orchestrator.run.payload import run_args

    cfg = parse_config(textwrap.dedent("""\
        name: t
        datasets: {demo: {generate: {size: 16}}}
        experiments:
          - name: ngp
            steps: 20
            backend: [torch, auto]
            train: {lr: [0.01, 0.005], log2_hashmap_size: 14, use_occupancy: false}
        """))
    jobs = expand(cfg)
    assert [j.job_id for j in jobs] == [
        "ngp-default-local-backendtorch-lr0.01", "ngp-default-local-backendtorch-lr0.005",
        "ngp-default-local-backendauto-lr0.01", "ngp-default-local-backendauto-lr0.005"]
    assert dict(jobs[1].train) == {"lr": 0.005, "log2_hashmap_size": 14, "use_occupancy": False}
    assert dict(jobs[1].settings) == {"backend": "torch", "lr": 0.005}
    args = run_args(data_dir="d", job_dir="j", steps=20, backend="torch", device="auto", scene="default",
                    max_seconds=None, downscale=1, seed=0, train=jobs[1].train)
    assert args.endswith("--train-option log2_hashmap_size=14 --train-option lr=0.005 "
                         "--train-option use_occupancy=false")


@pytest.mark.parametrize("train,message", [
    ("{lrr: 0.1}", "experiments[0].train.lrr: unknown key; did you mean 'lr'?"),
    ("{steps: 3}", "experiments[0].train.steps: steps is a setting of its own"),
    ("{log2_hashmap_size: 40}", "experiments[0].train.log2_hashmap_size: must be <= 26, got 40"),
    ("{precision: fp8}", "experiments[0].train.precision: 'fp8' is not allowed"),
    ("{lr: []}", "experiments[0].train.lr: an empty list gives no jobs"),
    ("{use_occupancy: 3}", "experiments[0].train.use_occupancy: expected true or false"),
])
def test_bad_train_options_name_the_key(train: str, message: str) -> None:
    text = f"name: t\ndatasets: {{demo: {{generate: {{size: 16}}}}}}\nexperiments:\n  - {{name: ngp, steps: 5, train: {train}}}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert message in str(err.value)
