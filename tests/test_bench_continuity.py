"""The benchmark client's continuity metric: what a listener hears from chunk arrival times."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_tts", Path(__file__).resolve().parents[1] / "scripts" / "bench_tts.py"
)
bench_tts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_tts)
continuity = bench_tts.continuity

RATE = 1000.0  # bytes per second of playback: 1000 bytes = 1 s


def test_chunks_that_arrive_in_time_play_without_a_gap():
    # 1 s of audio at t=0, the next second's bytes at 0.9 s, the third at 1.95 s
    out = continuity([(0.0, 1000), (0.9, 1000), (1.95, 1000)], RATE)
    assert out == {"longest_gap_s": 0.0, "gaps": 0, "underrun_s": 0.0, "gap_free": True}


def test_a_late_chunk_is_a_gap_and_playback_resumes_from_it():
    # the second chunk is due at 1.0 s and comes at 1.3 s: 0.3 s of silence; playback then
    # runs from 1.3 s, so the third chunk is due at 2.3 s and 2.32 s is only 20 ms late
    out = continuity([(0.0, 1000), (1.3, 1000), (2.32, 1000)], RATE)
    assert out["longest_gap_s"] == pytest.approx(0.3)
    assert out["gaps"] == 1
    assert out["underrun_s"] == pytest.approx(0.32)
    assert out["gap_free"] is False


def test_underruns_up_to_the_tolerance_are_not_heard():
    out = continuity([(0.0, 500), (0.54, 500)], RATE)
    assert out["longest_gap_s"] == pytest.approx(0.04)
    assert out["gap_free"] is True and out["gaps"] == 0
    assert continuity([(0.0, 500), (0.56, 500)], RATE)["gap_free"] is False


def test_playback_starts_at_the_first_byte_not_at_the_request():
    # a late first chunk is time to first audio, not a gap
    assert continuity([(5.0, 100), (5.05, 100)], RATE)["gap_free"] is True
    assert continuity([], RATE)["gap_free"] is True


def test_level_summary_counts_gap_free_utterances():
    records = [
        {
            "outcome": "done",
            "ttfa_ms": 100.0,
            "server_ttfb_ms": 90.0,
            "audio_s": 2.0,
            "rtf": 0.5,
            "longest_gap_s": g,
            "gap_free": g <= 0.05,
            "underrun_s": g,
        }
        for g in (0.0, 0.01, 0.2, 0.0)
    ] + [{"outcome": "error", "error_code": "busy", "ttfa_ms": None}]
    level = bench_tts.summarize(records, streams=2, wall=4.0)
    assert level["gap_free_share"] == 0.75
    assert level["busy"] == 1 and level["ok"] == 4 and level["utterances"] == 5
    assert level["longest_gap_max_s"] == 0.2
    assert level["audio_s_per_s"] == 2.0
