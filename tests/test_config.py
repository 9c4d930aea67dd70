"""experiments.yaml validation: a table of bad inputs (exact one-line messages with file:line:key),
the valid example's values, defaults, secrets by reference, and a hypothesis property test."""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import (
    GENERATOR_SCENES,
    ExperimentsConfig,
    HostConfig,
    check_secrets,
    load_config,
    parse_config,
)
from orchestrator.config.plan import expand
from orchestrator.errors import ConfigError
from orchestrator.estimate import estimate_plan

VALID = textwrap.dedent("""\
    name: t
    budget: {max_cost: 40, currency: cny}
    defaults: {backend: torch, seed: 3}
    hosts:
      here: {provider: local}
      box:
        provider: ssh
        host: 127.0.0.1
        port: 2222
        gpu: H100
        price_per_hour: 15
        currency: CNY
      vast: {provider: vastai, gpu: "4090", max_price_per_hour: 0.5, api_key_env: VAST_API_KEY}
    datasets:
      demo: {generate: {scene: default, size: 32}}
      synth:
        mirrors: ["https://example.invalid/nerf_synthetic.zip"]
        scenes: [lego, chair]
    experiments:
      - name: e
        dataset: demo
        scenes: [default, spheres]
        hosts: [here]
        steps: [10, 20]
      - name: big
        dataset: synth
        hosts: [box, vast]
        steps: 30000
        max_seconds: 120
    """)


def replace_line(text: str, lineno: int, new: str) -> str:
    lines = text.splitlines()
    lines[lineno - 1] = new
    return "\n".join(lines) + "\n"


# (name, yaml text, exact message). Line numbers refer to the text given.
BAD = [
    ("malformed YAML", "name: t\nhosts:\n  here: {provider: local\ndatasets: {}\n",
     "experiments.yaml:4: malformed YAML: expected ',' or '}', but got ':' "
     "(while parsing a flow mapping that starts on line 3)"),
    ("tab indentation", "name: t\n\thosts: 1\n",
     "experiments.yaml:2: malformed YAML: found character '\\t' that cannot start any token"),
    ("two documents", "name: t\n---\nname: u\n",
     "experiments.yaml:2: malformed YAML: expected a single document in the stream, but found another document"),
    ("unknown host key", replace_line(VALID, 9, "    prot: 2222"),
     "experiments.yaml:9: hosts.box.prot: unknown key; did you mean 'port'?"),
    ("unknown top key", "nmae: t\n", "experiments.yaml:1: nmae: unknown key; did you mean 'name'?"),
    ("unknown experiment key", replace_line(VALID, 24, "    step: [10, 20]"),
     "experiments.yaml:24: experiments[0].step: unknown key; did you mean 'steps'?"),
    ("ssh key on a vastai host", replace_line(VALID, 13, "  vast: {provider: vastai, gpu: 4090, port: 22}"),
     "experiments.yaml:13: hosts.vast.port: not a key for provider vastai: it is only for ssh hosts"),
    ("unknown GPU", replace_line(VALID, 13, "  vast: {provider: vastai, gpu: H1000}"),
     "experiments.yaml:13: hosts.vast.gpu: unknown GPU 'H1000'; did you mean 'H100 SXM'? "
     "(or give price_per_hour for a GPU the catalog does not list)"),
    ("unknown provider", replace_line(VALID, 5, "  here: {provider: locl}"),
     "experiments.yaml:5: hosts.here.provider: unknown provider 'locl'; did you mean 'local'?"),
    ("negative steps", replace_line(VALID, 28, "    steps: -5"),
     "experiments.yaml:28: experiments[1].steps: must be >= 1, got -5"),
    ("negative steps in a list", replace_line(VALID, 24, "    steps: [10, -20]"),
     "experiments.yaml:24: experiments[0].steps[1]: must be >= 1, got -20"),
    ("zero size", replace_line(VALID, 15, "  demo: {generate: {scene: default, size: 0}}"),
     "experiments.yaml:15: datasets.demo.generate.size: must be >= 8, got 0"),
    ("null inside a list axis", replace_line(VALID, 24, "    steps: [10, null]"),
     "experiments.yaml:24: experiments[0].steps[1]: empty value; give a steps value"),
    ("steps as text", replace_line(VALID, 28, "    steps: lots"),
     "experiments.yaml:28: experiments[1].steps: expected a whole number, got text 'lots'"),
    ("missing scene (generated)", replace_line(VALID, 22, "    scenes: [default, sphere]"),
     "experiments.yaml:22: experiments[0].scenes: unknown generated scene 'sphere' for dataset 'demo'; "
     "did you mean 'spheres'?"),
    ("missing scene (mirrored)", replace_line(VALID, 27, "    hosts: [box, vast]\n    scenes: [lego, hotdg]"),
     "experiments.yaml:28: experiments[1].scenes: dataset 'synth' has no scene 'hotdg'; "
     "expected one of: lego, chair"),
    ("unknown dataset", replace_line(VALID, 21, "    dataset: dmeo"),
     "experiments.yaml:21: experiments[0].dataset: unknown dataset 'dmeo'; did you mean 'demo'?"),
    ("unknown host", replace_line(VALID, 27, "    hosts: [box, vasst]"),
     "experiments.yaml:27: experiments[1].hosts: unknown host 'vasst'; did you mean 'vast'?"),
    ("literal password", replace_line(VALID, 12, "    password: hunter22"),
     "experiments.yaml:12: hosts.box.password: a secret cannot be written in the file; "
     "use password_env: VAR_NAME or password_file: PATH"),
    ("literal api_key", replace_line(VALID, 13, "  vast: {provider: vastai, gpu: 4090, api_key: abcdef123}"),
     "experiments.yaml:13: hosts.vast.api_key: a secret cannot be written in the file; "
     "use api_key_env: VAR_NAME or api_key_file: PATH"),
    ("literal token", replace_line(VALID, 1, "token: zzz999"),
     "experiments.yaml:1: token: a secret cannot be written in the file; use token_env: VAR_NAME or token_file: PATH"),
    ("ssh without price", replace_line(VALID, 11, "    user: me"),
     "experiments.yaml:7: hosts.box.price_per_hour: missing; an ssh host needs what it costs you per hour, "
     "e.g. price_per_hour: 15 with currency: CNY"),
    ("cloud key on an ssh host", replace_line(VALID, 11, "    region: x"),
     "experiments.yaml:11: hosts.box.region: not a key for provider ssh: it is only for cloud (vastai, runpod, lambda) hosts"),
    ("duplicate key", replace_line(VALID, 2, "name: u"),
     "experiments.yaml:2: name: duplicate key (first given on line 1)"),
    ("bad backend", replace_line(VALID, 3, "defaults: {backend: tcn}"),
     "experiments.yaml:3: defaults.backend: 'tcn' is not allowed; did you mean 'tcnn'?"),
    ("cuda on a cpu host", replace_line(VALID, 24, "    steps: 10\n    device: cuda"),
     "experiments.yaml:25: experiments[0].device: device cuda needs a GPU but host 'here' has none "
     "(gpu: cpu); use auto"),
    ("no experiments", "name: t\ndatasets: {d: {generate: {}}}\n",
     "experiments.yaml:1: experiments: expected a non-empty list of experiments (`- name: ...`); it is missing"),
    ("top level list", "- a\n- b\n", "experiments.yaml:1: expected a mapping at the top, got a list"),
    ("empty file", "", "experiments.yaml:1: the file is empty; it needs name:, datasets: and experiments:"),
    ("recursive alias", "name: &a [*a]\n",
     "experiments.yaml:1: name[0]: an alias refers to itself (recursive anchor)"),
    ("python tag", "name: !!python/object/apply:os.system [ls]\n",
     "experiments.yaml:1: name: unsupported tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("bad mirror scheme", replace_line(VALID, 17, '    mirrors: ["ftp://example.invalid/x.zip"]'),
     "experiments.yaml:17: datasets.synth.mirrors[0]: 'ftp://example.invalid/x.zip' is not a URL this tool "
     "can fetch; use one of https://, http://, s3://, hf://, file://"),
    ("ssh host reached two ways", replace_line(VALID, 8, "    host: 127.0.0.1\n    ssh_alias: gpu"),
     "experiments.yaml:9: hosts.box: say how to reach the host with exactly one of host:, ssh_alias: or "
     "endpoint_command: (got host, ssh_alias)"),
]


@pytest.mark.parametrize("name,text,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gives_one_exact_line(name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "experiments.yaml")
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_valid_example_values() -> None:
    cfg = parse_config(VALID, "experiments.yaml")
    assert isinstance(cfg, ExperimentsConfig)
    assert cfg.name == "t" and cfg.budget is not None
    assert (cfg.budget.max_cost, cfg.budget.currency) == (40.0, "CNY")
    here, box, vast = cfg.hosts["here"], cfg.hosts["box"], cfg.hosts["vast"]
    assert (here.gpu, here.price_per_hour, here.python, here.root) == ("cpu", 0.0, sys.executable, None)
    assert (box.gpu, box.price_per_hour, box.currency, box.host, box.port) == ("H100 SXM", 15.0, "CNY", "127.0.0.1", 2222)
    assert box.line == 6 and box.python is None and box.idle_timeout_s == 600.0
    assert (vast.gpu, vast.max_price_per_hour, vast.price_per_hour, vast.api_key_env) == ("RTX 4090", 0.5, None, "VAST_API_KEY")
    demo, synth = cfg.datasets["demo"], cfg.datasets["synth"]
    assert demo.generate is not None and (demo.generate.scene, demo.generate.size, demo.generate.seed) == ("default", 32, 0)
    assert synth.generate is None and synth.mirrors == ("https://example.invalid/nerf_synthetic.zip",)
    e, big = cfg.experiments
    assert (e.scenes, e.hosts, e.steps, e.backend, e.seed) == (("default", "spheres"), ("here",), (10, 20), "torch", 3)
    assert big.scenes == ("lego", "chair")          # from the dataset's scene list
    assert (big.steps, big.max_seconds, big.hosts) == (30000, 120.0, ("box", "vast"))
    with pytest.raises(Exception):
        cfg.hosts["x"] = here  # type: ignore[index]
    with pytest.raises(Exception):
        box.gpu = "x"  # type: ignore[misc]


def test_defaults_and_embedded_local_host() -> None:
    cfg = parse_config("name: m\ndatasets: {d: {generate: {}}}\nexperiments: [{name: x, steps: 5}]\n")
    assert list(cfg.hosts) == ["local"]
    assert cfg.hosts["local"] == HostConfig(name="local", provider="local", gpu="cpu", price_per_hour=0.0,
                                            python=sys.executable, line=1)
    (x,) = cfg.experiments
    assert (x.dataset, x.hosts, x.scenes, x.steps, x.backend, x.device, x.downscale, x.seed, x.max_seconds) == \
        ("d", ("local",), ("default",), 5, "auto", "auto", 1, 0, None)
    assert cfg.datasets["d"].generate.size == 64


def test_unknown_gpu_accepted_with_a_price() -> None:
    text = replace_line(VALID, 10, "    gpu: B200")
    cfg = parse_config(text)
    assert cfg.hosts["box"].gpu == "B200" and cfg.hosts["box"].gpu_in_catalog is False


def test_generator_scene_names_match_ngp_train() -> None:
    synth = pytest.importorskip("ngp_train.synth")
    assert GENERATOR_SCENES == tuple(synth.SCENES)


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    p = tmp_path / "exp.yaml"
    with pytest.raises(ConfigError, match=r"exp\.yaml: no such file"):
        load_config(p)
    p.write_text(replace_line(VALID, 9, "    prot: 2222"))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value) == f"{p}:9: hosts.box.prot: unknown key; did you mean 'port'?"
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not a text file"):
        load_config(p)


def test_secret_file_checked_at_load_and_never_stored(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-value-42\n")
    text = replace_line(VALID, 12, f"    password_file: {secret}")
    cfg = parse_config(text)
    assert cfg.hosts["box"].password_file == str(secret)
    assert "s3cr3t-value-42" not in repr(cfg)
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        parse_config(replace_line(VALID, 12, f"    password_file: {missing}"))
    msg = str(info.value)
    assert msg.startswith("experiments.yaml:12: hosts.box.password_file: cannot read secret file ")
    assert str(missing) in msg and msg.endswith("; the file must hold the password")
    if os.geteuid() != 0:
        secret.chmod(0)
        with pytest.raises(ConfigError, match=r"^experiments\.yaml:12: hosts\.box\.password_file: cannot read"):
            parse_config(text)


def test_env_secret_checked_before_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    text = replace_line(VALID, 12, "    password_env: ORCH_TEST_PW")
    cfg = parse_config(text)
    monkeypatch.delenv("ORCH_TEST_PW", raising=False)
    with pytest.raises(ConfigError) as info:
        check_secrets(cfg, ["box"])
    assert str(info.value) == "experiments.yaml:6: hosts.box.password_env: environment variable ORCH_TEST_PW is not set"
    check_secrets(cfg, ["here"])                       # other hosts are not checked
    monkeypatch.setenv("ORCH_TEST_PW", "pw-value-1234")
    check_secrets(cfg, ["box"])
    for literal in ("hunter2 pw", "a3f9c0d1e2b4a5968778695a4b3c2d1e0f9a8b7c"):
        with pytest.raises(ConfigError) as info:
            parse_config(replace_line(VALID, 12, f"    password_env: {literal}"))
        assert str(info.value).startswith("experiments.yaml:12: hosts.box.password_env: expected the name of an "
                                          "environment variable")
        assert literal not in str(info.value) and literal not in (info.value.hint or "")
    assert parse_config(replace_line(VALID, 12, "    password_env: GPULINK_PASSWORD_2")).hosts["box"].password_env \
        == "GPULINK_PASSWORD_2"


def test_identity_file_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^experiments\.yaml:12: hosts\.box\.identity_file: cannot read"):
        parse_config(replace_line(VALID, 12, f"    identity_file: {tmp_path / 'id_missing'}"))
    key = tmp_path / "id"
    key.write_text("key")
    assert parse_config(replace_line(VALID, 12, f"    identity_file: {key}")).hosts["box"].identity_file == str(key)


def test_merge_keys_and_anchors_work() -> None:
    text = VALID.replace("  vast: {provider: vastai", "  vast: &v {provider: vastai") + ""
    text = text.replace("datasets:", "  vast2: {<<: *v, max_price_per_hour: 0.9}\ndatasets:", 1)
    cfg = parse_config(text)
    assert cfg.hosts["vast2"].max_price_per_hour == 0.9 and cfg.hosts["vast2"].gpu == "RTX 4090"


# --- property test: random documents give a valid config or one ConfigError, nothing else ----

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                     st.sampled_from(["local", "ssh", "vastai", "H100", "4090", "default", "lego", "auto",
                                      "cuda", "cpu", "here", "demo", "e", "-1", "0", "~"]))
_keys = st.one_of(st.text(max_size=10), st.sampled_from(
    ["name", "hosts", "datasets", "experiments", "provider", "gpu", "steps", "scenes", "generate",
     "size", "price_per_hour", "password", "api_key_file", "mirrors", "dataset", "budget", "max_cost"]))
_docs = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(_keys, inner, max_size=5)),
                     max_leaves=25)


def _check(text: str) -> None:
    try:
        cfg = parse_config(text, "experiments.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("experiments.yaml"), str(exc)
        assert "\n" not in str(exc)
        assert "Traceback" not in str(exc)
    else:
        assert isinstance(cfg, ExperimentsConfig) and cfg.experiments
        try:                                   # a valid config also plans and estimates cleanly
            jobs = expand(cfg)
            estimate_plan(jobs, probe_mirrors=False)
        except ConfigError as exc:
            assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_docs)
def test_random_documents_only_clean_errors(doc: object) -> None:
    _check(yaml.safe_dump(doc, allow_unicode=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutations_of_the_valid_example(data: st.DataObject) -> None:
    text = VALID
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["delete", "insert", "replace_line", "swap_value"]))
        pos = data.draw(st.integers(0, len(text)))
        if kind == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 8)):]
        elif kind == "insert":
            text = text[:pos] + data.draw(st.sampled_from(
                [":", "-", "[", "]", "{", "}", "&a ", "*a", "!!", "'", '"', "\t", "\n", " ", "#", "0", "-1",
                 "<<: *x", "? ", "%YAML 1.1\n", "\x00", "é"])) + text[pos:]
        elif kind == "replace_line":
            lines = text.splitlines()
            if lines:
                i = data.draw(st.integers(0, len(lines) - 1))
                lines[i] = lines[i].split(":")[0] + ": " + yaml.safe_dump(data.draw(_scalars)).split("\n")[0]
                text = "\n".join(lines) + "\n"
        else:
            text = text.replace(data.draw(st.sampled_from(["10", "local", "H100", "demo", "here", "32", "15"])),
                                data.draw(st.sampled_from(["-3", "null", "[]", "{}", "x", "0", ".inf", "1e400",
                                                           "-.inf", ".nan", "1.0e+308", "1e3", "2.5e1",
                                                           "1e-400", "*nowhere"])), 1)
    _check(text)


def test_release_retry_window_is_a_cloud_host_setting() -> None:
    text = VALID.replace("max_price_per_hour: 0.5,", "max_price_per_hour: 0.5, release_retry_s: 120,", 1)
    assert parse_config(text, "experiments.yaml").hosts["vast"].release_retry_s == 120.0
    assert parse_config(VALID, "experiments.yaml").hosts["vast"].release_retry_s is None
    with pytest.raises(ConfigError, match=r"hosts\.vast\.release_retry_s"):
        parse_config(VALID.replace("max_price_per_hour: 0.5,", "max_price_per_hour: 0.5, release_retry_s: 0,", 1),
                     "experiments.yaml")


# --- aliases: shared settings work, an alias bomb is refused quickly with one line -----------

@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(breadth=st.integers(1, 12), depth=st.integers(1, 9),
       leaf=st.sampled_from(['"lol"', "1", ".inf", "-.inf", ".nan", "1.0e+308", "1e3", "{a: 1}"]),
       where=st.sampled_from(["steps", "scenes", "seed", "max_seconds", "root", "merge"]))
def test_alias_chains_are_bounded(breadth: int, depth: int, leaf: str, where: str) -> None:
    import time
    chain = [f"&a0 [{', '.join([leaf] * breadth)}]"]
    for k in range(1, depth):
        chain.append(f"&a{k} [{', '.join([f'*a{k - 1}'] * breadth)}]")
    top = f"[{', '.join(chain)}]" if depth > 1 or breadth > 1 else chain[0]
    text = VALID
    if where == "merge":
        text = text.replace("  here: {provider: local}", f"  here: {{<<: {{k: {top}}}, provider: local}}")
    elif where == "root":
        text = text.replace("  here: {provider: local}", f"  here: {{provider: local, root: {top}}}")
    else:
        text = text.replace("        steps: 30000", f"        steps: 30000\n        {where}: {top}"
                            if where != "steps" else f"        steps: {top}")
        if where == "max_seconds":
            text = text.replace("        max_seconds: 120\n", "")
    t0 = time.monotonic()
    _check(text)
    assert time.monotonic() - t0 < 10


def test_alias_sharing_settings_still_works() -> None:
    text = VALID.replace("defaults: {backend: torch, seed: 3}", "defaults: &d {backend: torch, seed: 3}")
    text = text.replace("        max_seconds: 120", "        max_seconds: 120\n        <<: *d")
    cfg = parse_config(text)
    assert cfg.experiments[1].seed == 3 and cfg.experiments[1].backend == "torch"
