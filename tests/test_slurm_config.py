"""The `slurm` host entry (config) and the batch script and accounting parsers of the provider.

The accounting texts are the documented output formats: `sacct --parsable2 --noheader -X
--format=JobID,State,Start,ElapsedRaw,AllocTRES,ExitCode` (https://slurm.schedmd.com/sacct.html,
times as epoch seconds with SLURM_TIME_FORMAT=%s) and `scontrol -o show job`
(https://slurm.schedmd.com/scontrol.html). The end-to-end tests (test_slurm_e2e.py) run the real
commands against a real cluster; these pin the parsing of the form only slurmdbd prints.
"""
from __future__ import annotations

import textwrap

import pytest

from orchestrator.config import parse_config
from orchestrator.config.sections import slurm_time_s, slurm_units
from orchestrator.errors import ConfigError
from orchestrator.providers.slurm import batch_script, parse_accounting, parse_squeue, time_limit_s


def config(host: str) -> str:
    return textwrap.dedent("""\
        name: t
        hosts:
          hpc:
        {host}
        datasets:
          demo: {{generate: {{size: 16}}}}
        experiments:
          - {{name: e, dataset: demo, scenes: [default], hosts: [hpc], steps: 10}}
        """).format(host=textwrap.indent(textwrap.dedent(host), "    "))


GOOD = """\
provider: slurm
ssh_alias: login1
gpu: A100 SXM
gres: "gpu:a100:2"
partition: gpu
account: proj42
qos: normal
cpus_per_task: 8
mem: 64G
time_limit: "1-02:00:00"
sbatch_lines: ["#SBATCH --constraint=a100", "#SBATCH --exclusive"]
setup: "module load cuda/12.1; source ~/venv/bin/activate"
python: python
root: /scratch/me/orchestrate
price_per_gpu_hour: 1.5
"""


def test_a_slurm_host_entry_reads_every_setting() -> None:
    h = parse_config(config(GOOD)).hosts["hpc"]
    assert (h.provider, h.ssh_alias, h.gpu, h.gres, h.partition, h.account, h.qos) == \
        ("slurm", "login1", "A100 80GB SXM", "gpu:a100:2", "gpu", "proj42", "normal")
    assert (h.cpus_per_task, h.mem, h.time_limit_s, h.python, h.root) == \
        (8, "64G", 26 * 3600.0, "python", "/scratch/me/orchestrate")
    assert h.sbatch_lines == ("#SBATCH --constraint=a100", "#SBATCH --exclusive")
    assert h.price_per_gpu_hour == 1.5 and h.price_per_hour == 3.0      # two GPUs per task
    assert h.setup == ("module load cuda/12.1; source ~/venv/bin/activate",)
    jumped = parse_config(config("provider: slurm\nhost: login\ngpu: H100\nproxy_jump: me@bastion:2222\n"))
    assert jumped.hosts["hpc"].proxy_jump == "me@bastion:2222"


def test_a_cpu_partition_is_charged_per_cpu_and_defaults_to_gpu_cpu() -> None:
    h = parse_config(config("provider: slurm\nhost: login\ngres: none\ncpus_per_task: 4\n"
                            "price_per_gpu_hour: 0.5\n")).hosts["hpc"]
    assert (h.gres, h.gpu, h.price_per_hour) == (None, "cpu", 2.0)
    default = parse_config(config("provider: slurm\nhost: login\ngpu: H100\n")).hosts["hpc"]
    assert (default.gres, default.price_per_hour) == ("gpu:1", 0.0)


@pytest.mark.parametrize("host, message", [
    ("provider: slurm\nhost: a\ngpu: H100\npartion: gpu\n",
     "experiments.yaml:7: hosts.hpc.partion: unknown key; did you mean 'partition'?"),
    ("provider: slurm\nhost: a\ngpu: H100\nprice_per_hour: 2\n",
     "experiments.yaml:7: hosts.hpc.price_per_hour: unknown key; did you mean 'price_per_gpu_hour'?"),
    ("provider: ssh\nhost: a\ngpu: H100\nprice_per_hour: 2\npartition: gpu\n",
     "experiments.yaml:8: hosts.hpc.partition: not a key for provider ssh: it is only for slurm hosts"),
    ("provider: slurm\nhost: a\ngpu: H100\ntime_limit: soon\n",
     "experiments.yaml:7: hosts.hpc.time_limit: 'soon' is not a Slurm time limit"),
    ("provider: slurm\nhost: a\ngpu: H100\nsbatch_lines: [\"--exclusive\"]\n",
     "experiments.yaml:7: hosts.hpc.sbatch_lines[0]: '--exclusive' does not start with \"#SBATCH \""),
    ("provider: slurm\nhost: a\ngpu: H100\ngres: \"tpu:1\"\n",
     "experiments.yaml:7: hosts.hpc.gres: 'tpu:1': expected gpu:<count>"),
    ("provider: slurm\nhost: a\ngpu: H100\npartition: \"gpu\\n#SBATCH --uid=0\"\n",
     "experiments.yaml:7: hosts.hpc.partition: may use only letters, digits"),
    ("provider: slurm\nhost: a\ngpu: H100\nmem: 16 G\n",
     "experiments.yaml:7: hosts.hpc.mem: may use only letters, digits"),
    ("provider: slurm\nhost: a\ngpu: H100\ntorch: install\n",
     "experiments.yaml:7: hosts.hpc.torch: unknown key"),
    ("provider: slurm\ngpu: H100\n",
     "hosts.hpc: say how to reach the host with exactly one of host:, ssh_alias: or endpoint_command:"),
])
def test_bad_slurm_entries_are_one_line_with_file_line_and_key(host: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(config(host))
    text = str(exc.value)
    assert message in text, text
    assert "\n" not in text.split(" (hint")[0]


@pytest.mark.parametrize("text, seconds", [("90", 5400.0), ("10:30", 630.0), ("2:00:00", 7200.0),
                                           ("1-00", 86400.0), ("1-02:30", 95400.0), ("0-00:00:05", 5.0),
                                           ("x", None), ("1:2:3:4", None)])
def test_slurm_time_limits(text: str, seconds: float | None) -> None:
    assert slurm_time_s(text) == seconds


def test_units_are_the_gres_count_else_the_cpus() -> None:
    assert [slurm_units(g, 4) for g in ("gpu:1", "gpu:a100:2", "gpu", None)] == [1, 2, 1, 4]


def test_the_batch_script_is_one_array_throttled_with_the_host_settings() -> None:
    h = parse_config(config(GOOD)).hosts["hpc"]
    script = batch_script(host=h, run_id="20260101-000000-abcd", job_ids=["e-a-hpc", "e-b-hpc", "e-c-hpc"],
                          task_commands=["cd /j/a && exec run a", "cd /j/b && exec run b", "cd /j/c && exec run c"],
                          log_dir="/scratch/me/orchestrate/slurm/r", concurrency=2,
                          time_limit_s=time_limit_s(h, 100.0))
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in ("#SBATCH --job-name=orch-20260101-000000-abcd", "#SBATCH --comment=e-a-hpc,e-b-hpc,e-c-hpc",
                 "#SBATCH --array=0-2%2", "#SBATCH --time=1560", "#SBATCH --gres=gpu:a100:2",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --qos=normal",
                 "#SBATCH --mem=64G", "#SBATCH --cpus-per-task=8", "#SBATCH --constraint=a100",
                 "module load cuda/12.1; source ~/venv/bin/activate", "  1) cd /j/b && exec run b ;;"):
        assert want in lines, want
    # every #SBATCH line comes before the first command (sbatch stops reading them there)
    first_command = next(i for i, line in enumerate(lines[1:], 1) if not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])


def test_without_a_time_limit_it_is_twice_the_estimate_plus_ten_minutes() -> None:
    h = parse_config(config("provider: slurm\nhost: login\ngpu: H100\n")).hosts["hpc"]
    assert time_limit_s(h, 1800.0) == 4200.0 and time_limit_s(h, 1.0) == 602.0


def test_sacct_output_gives_elapsed_and_allocated_gpus() -> None:
    out = ("4242_0|COMPLETED|1767225600|93|billing=8,cpu=8,gres/gpu=2,mem=64G,node=1|0:0\n"
           "4242_1|FAILED|1767225700|12|billing=8,cpu=8,gres/gpu=2,mem=64G,node=1|1:0\n"
           "4242_[2-3]|PENDING|Unknown|0||0:0\n")
    acct = parse_accounting(out)
    assert sorted(acct) == [0, 1]
    a = acct[0]
    assert (a.job_id, a.state, a.start_epoch, a.elapsed_s, a.alloc_gpus, a.alloc_cpus, a.done) == \
        ("4242_0", "COMPLETED", 1767225600.0, 93.0, 2, 8, True)
    assert a.billed_units() == 2 and acct[1].state == "FAILED"


def test_scontrol_output_is_the_fallback_without_slurmdbd() -> None:
    out = ("#scontrol\nJobId=7 ArrayJobId=6 ArrayTaskId=1 JobName=orch-r JobState=CANCELLED Reason=None "
           "ExitCode=0:15 RunTime=00:01:05 StartTime=1767225600 EndTime=1767225665 "
           "TRES=cpu=2,mem=1G,node=1,billing=2 Comment=a,b\n")
    [(task, s)] = parse_accounting(out).items()
    assert (task, s.job_id, s.state, s.elapsed_s, s.alloc_cpus, s.alloc_gpus, s.billed_units()) == \
        (1, "6_1", "CANCELLED", 65.0, 2, 0, 2)


def test_squeue_lines_expand_to_tasks() -> None:
    out = "12|12|0|RUNNING|1767225600|None|orch-r|a,b\n13|12|1|PENDING|N/A|JobArrayTaskLimit|orch-r|a,b\n"
    rows = parse_squeue(out)
    assert [(r.job_id, r.task, r.state, r.start_epoch, r.reason) for r in rows] == [
        ("12_0", 0, "RUNNING", 1767225600.0, "None"), ("12_1", 1, "PENDING", None, "JobArrayTaskLimit")]
