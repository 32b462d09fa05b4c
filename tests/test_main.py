"""``python -m mamba_scan``: the environment report and the layer parity checks it prints."""

import torch

from mamba_scan import __main__ as cli

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    assert "CPU path" in capsys.readouterr().out


def test_layer_checks_pass():
    for device in DEVICES:
        for name, (got, ref32, ref64) in cli._layer_checks(device).items():
            e, ept = cli._err(got, ref64), cli._err(ref32, ref64)
            assert e <= 2 * ept + 1e-5 * max(ref64.abs().max().item(), 1.0), (device, name, e, ept)
