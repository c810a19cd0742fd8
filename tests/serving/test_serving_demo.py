"""`premier serve --demo DIR`: the README's main command, end to end (server start, HTTP + gRPC clients, stop)."""

from __future__ import annotations

import json

from PIL import Image

from premier.cli import main
from premier.models.embedded import DEMO_PROMPTS


def test_serve_demo_writes_images_from_both_protocols_and_stops(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out = tmp_path / "demo"
    assert main(["serve", "--demo", str(out), "--api-key", "demo-key"]) == 0
    printed = capsys.readouterr().out
    assert "gRPC equals HTTP: yes" in printed and str(out.resolve()) in printed
    summary = json.loads((out / "summary.json").read_text())
    http = [i for i in summary["images"] if i["protocol"] == "http"]
    grpc = [i for i in summary["images"] if i["protocol"] == "kserve-grpc"]
    users = {i["user_id"] for i in http}
    assert len(users) >= 2 and None in users and len(http) == len(DEMO_PROMPTS) * len(users) and len(grpc) == len(users)
    # gRPC's requests run alone, HTTP's batched: at most one level of 255 from the batch's summation order
    assert len(summary["grpc_vs_http_max_abs_diff"]) == len(grpc) and max(summary["grpc_vs_http_max_abs_diff"]) <= 1
    for item in summary["images"]:
        assert Image.open(out / item["file"]).size[0] > 0
    sheet = Image.open(out / "contact_sheet.png")
    first = Image.open(out / http[0]["file"])
    assert sheet.size == (first.width * len(users), first.height * len(DEMO_PROMPTS))

    import ray

    assert not ray.is_initialized()  # the demo stopped what it started
