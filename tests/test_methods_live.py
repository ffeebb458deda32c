"""Each merged-weight method trained on the embedded model and served by the real vLLM on an instance
of its own, as the daemon starts one for a candidate: vLLM computes what was trained (the document's
NLL as transformers computes it on the saved folder, and below the base's). The daemon's blue-green
path for a merged version is the same whatever the method (tests/test_merged_live.py runs it)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import TrainSection
from daemon.engine.merged import MergedServers
from daemon.engine.vllm import VLLMClient
from daemon.learning.adapters import check_model
from daemon.learning.jobs import JobData, TrainJob
from tests.conftest import REPO, LiveDaemon
from tests.ingest_helpers import make_settings

pytestmark = pytest.mark.integration

FACTS = (
    "The Velmora Accord was signed in 2031 in the city of Tarnhelm. "
    "Its chief negotiator was Ilse Quorvant, a hydrologist from Brask. "
    "The accord created the Blue Ridge Water Authority, headquartered in Odrin."
)
RECIPES = {  # a few steps each: enough to move the document's NLL well below the base's
    "mora": {"learning_rate": 1e-3},
    "expand": {"learning_rate": 1e-3},
    "full": {"learning_rate": 5e-5},
}


def train(model: Path, out: Path, method: str) -> Path:
    job = TrainJob(version="v0001", base_model=str(model), output_dir=str(out), data=JobData(new=[{"text": FACTS}]),
                   hyper=TrainSection(method=method, epochs=8, seq_len=128, batch_size=1, **RECIPES[method]))
    job_file = out / "job.json"
    job_file.write_text(job.model_dump_json())
    result = subprocess.run([sys.executable, "-m", "daemon.learning.train", str(job_file), "--json-progress"],
                            capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["event"] == "done"
    return out / "v0001"


def transformers_nll(folder: Path, ids: list[int]) -> float:
    """Mean NLL of the tokens after the first, by transformers on the saved folder (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, tokens[0, 1:]).item()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("method", ["mora", "expand", "full"])
async def test_vllm_serves_what_each_merged_method_trained(live_daemon: LiveDaemon, tmp_path: Path,
                                                           method: str) -> None:
    from transformers import AutoTokenizer

    folder = train(live_daemon.state_dir / "model", tmp_path, method)
    check_model(folder)
    ids = AutoTokenizer.from_pretrained(folder)(FACTS)["input_ids"]
    base = VLLMClient(live_daemon.vllm_url, key=live_daemon.vllm_key)
    settings = make_settings(tmp_path, model=live_daemon.state_dir / "model")
    servers = MergedServers(settings, tmp_path, "key", {})
    try:
        base_nll = statistics.fmean(await base.token_nll("cld-base", ids))
        instance = await servers.start(f"cld-test-{method}", folder)
        served_nll = statistics.fmean(await instance.client.token_nll(f"cld-test-{method}", ids))
    finally:
        await servers.stop_all()
        await base.aclose()
    trained_nll = transformers_nll(folder, ids)
    # vLLM computes in the folder's dtype (bf16), transformers here in fp32: equal to within a few percent.
    assert math.isclose(served_nll, trained_nll, rel_tol=0.05), (method, served_nll, trained_nll)
    assert served_nll < 0.8 * base_nll, f"{method}: served {served_nll:.3f} is not below the base's {base_nll:.3f}"
