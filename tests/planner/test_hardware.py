"""Hardware files: figures round-trip through YAML, and a missing or malformed file fails with one line."""

import pytest

from reflow.planner.hardware import Hardware, HardwareError, hardware


def test_hardware_file_round_trip_and_one_line_errors(tmp_path):
    hw = hardware("cpu").with_(call_overhead=3e-3, cores_per_node=1.5, fsdp_overhead=1e-4)
    path = tmp_path / "hw.yaml"
    hw.save(path, measured={"rows": [{"what": "x", "measured_s": 1.0}]})
    assert Hardware.load(path) == hw
    assert hardware(str(path)) == hw  # a .yaml name where a preset name goes
    with pytest.raises(HardwareError, match="does not exist"):
        Hardware.load(tmp_path / "nope.yaml")
    path.write_text("name: x\nflops: 1e9\nwarp_speed: 9\n")
    with pytest.raises(HardwareError, match="unknown hardware figure.*warp_speed"):
        Hardware.load(path)
    path.write_text(path.read_text().replace("warp_speed: 9", "mem_bw: fast"))
    with pytest.raises(HardwareError):
        Hardware.load(path)
