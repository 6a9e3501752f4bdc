"""The voice helpers from a plain sidecar install: ``pipecat_chatterbox`` without pipecat-ai."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Runs in a fresh interpreter where importing pipecat fails, as without pipecat-ai installed.
SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys

    class NoPipecat:
        def find_spec(self, name, path=None, target=None):
            if name == "pipecat" or name.startswith("pipecat."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoPipecat())

    import pipecat_chatterbox
    from pipecat_chatterbox import SidecarError, list_voices, register_voice

    async def main(url):
        voices = await list_voices(url)
        try:
            await register_voice(url, "../bad", __file__)
        except SidecarError as e:
            code = e.code
        try:
            pipecat_chatterbox.ChatterboxTTSService
        except ImportError as e:
            service = str(e)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "pipecat")
        print(json.dumps({"voices": voices, "code": code, "service": service, "loaded": loaded}))

    asyncio.run(main(sys.argv[1]))
    """
)


def test_voice_helpers_work_without_pipecat(sidecar, tmp_path):
    script = tmp_path / "no_pipecat.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), sidecar.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "default" in {v["voice_id"] for v in result["voices"]}
    assert result["code"] == "invalid_request"
    assert "needs pipecat-ai" in result["service"]
    assert result["loaded"] == []
