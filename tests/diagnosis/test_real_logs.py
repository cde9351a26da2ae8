"""Real public training logs (../shared/real_logs, see its README): each is read and
diagnosed truthfully. Skipped where the folder is absent; never copied into the repo."""

import json
import os
from pathlib import Path

import pytest

from stablestep.cli import main
from stablestep.diagnosis import diagnose, load

# ../shared/real_logs next to the checkout; STABLESTEP_REAL_LOGS points elsewhere (a worktree)
ROOT = Path(os.environ.get("STABLESTEP_REAL_LOGS") or
            Path(__file__).resolve().parents[2] / ".." / "shared" / "real_logs")
pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason="../shared/real_logs not present")


def _p(name):
    return str(ROOT / name)


def test_every_file_is_readable():
    files = [f for f in os.listdir(ROOT) if not f.endswith(".md")]
    assert len(files) >= 8
    for f in files:
        assert all(len(t) >= 3 for t in load(_p(f))), f


@pytest.mark.parametrize("name,loss,step", [
    ("KellerJordan_modded-nanogpt__2024-10-13_llmc_main.log", "trl", "s"),
    ("karpathy_nanoGPT_issue215__gpt2_124M_fp16_nan.csv", "train_loss", "iter"),
    ("Mabdel-03_9.520-The-Geometry-of-Grok__07_slingshot_adam__training_history.json",
     "train_loss", "epoch"),
    ("bigscience-workshop_bigscience__chronicles_spike_iterations.csv", "lm_loss", "iteration"),
])
def test_the_reader_says_which_columns_it_read(name, loss, step):
    infos = []
    traces = load(_p(name), infos=infos)
    assert [(i.loss_column, i.step_column) for i in infos] == [(loss, step)] * len(traces)
    assert [i.points for i in infos] == [len(t) for t in traces]
    assert not any(i.coarse for i in infos)  # every 100th full-batch epoch is not coarse


@pytest.mark.parametrize("name,steps", [
    ("KellerJordan_modded-nanogpt__2024-06-06_AdamW_baseline.log", 9536),
    ("KellerJordan_modded-nanogpt__2024-10-13_llmc_main.log", 19560),
])
def test_long_clean_runs_have_no_false_alarm(name, steps):
    (t,) = load(_p(name))
    assert len(t) == steps
    assert diagnose(_p(name)) == []


def test_grokking_slingshot_adam_has_recurring_spikes():
    name = "Mabdel-03_9.520-The-Geometry-of-Grok__07_slingshot_adam__training_history.json"
    found = diagnose(_p(name))
    # one point per 100 steps: the loss that jumps 0.0081 -> 0.189 at 3700 and stays up for
    # ten records may also be framed as a jump; the recurring spikes are one finding
    periodic = [x for x in found if x.kind == "periodic-spikes"]
    assert len(periodic) == 1 and {x.kind for x in found} <= {"periodic-spikes", "divergence"}
    f = periodic
    ev = f[0].evidence
    assert ev["n_spikes"] >= 10
    # only a loss curve: no mechanism is claimed for any finding, the missing evidence named
    assert all(x.mechanism == "unknown" for x in found)
    assert "precond_sharpness" in ev["missing"] and "grad_norm" in ev["missing"]
    assert ev["suspected"] == "adaptive-edge-of-stability"
    assert any(r.action == "amsgrad" for r in f[0].remedies)


def test_nanogpt_fp16_nan_is_non_finite_not_blamed_on_adam():
    (f,) = diagnose(_p("karpathy_nanoGPT_issue215__gpt2_124M_fp16_nan.csv"))
    assert (f.step, f.kind, f.mechanism) == (3010, "non-finite", "non-finite")
    restore = next(r for r in f.remedies if r.action == "restore")
    assert restore.value == 3000


def test_char_cnn_adam_explosion_is_one_divergence():
    (f,) = diagnose(_p("lc222_char-cnn-text-classification-tensorflow_issue3__adam_explosion.csv"))
    assert (f.step, f.kind) == (3871, "divergence")
    assert f.evidence["peak_over_baseline"] > 1000


def test_litgpt_run_a_jumps_to_chance_level_and_stays():
    name = "Lightning-AI_litgpt_issue628__codellama7b_full_finetune_spike.csv"
    (f,) = diagnose(_p(name), run="A_default_precision")
    assert (f.step, f.kind) == (1152, "divergence")  # 1.70 -> ~11 for the rest of the log
    assert f.evidence["short_excerpt_records"] == 9
    assert f.evidence["peak_over_baseline"] > 6


def test_bigscience_segments_each_show_their_spike():
    f = diagnose(_p("bigscience-workshop_bigscience__chronicles_spike_iterations.csv"))
    runs = {x.evidence["run"] for x in f}
    assert len(runs) == 7
    first = next(x for x in f if x.evidence["run"].startswith("tr1-13B"))
    assert first.step == 29050 and first.kind == "spike"
    assert first.evidence["loss_scale_halvings"] == 4  # fp16 scale 65536 -> 4096 around it
    bloom = next(x for x in f if x.evidence["run"].startswith("tr11-176B"))
    assert bloom.evidence["grad_norm_over_median_before"] > 100  # 0.24 ... 960
    assert all(x.mechanism == "unknown" for x in f)  # no curvature, no Adam statistics


def test_cli_json_on_real_log(capsys):
    path = _p("karpathy_nanoGPT_issue215__gpt2_124M_fp16_nan.csv")
    assert main(["diagnose", path, "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert out.count("\n") == 1 and doc["source"] == path
    assert doc["findings"][0]["mechanism"] == "non-finite"
