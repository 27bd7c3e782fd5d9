"""The start-up line's CUDA facts: version numbers as CUDA and cuDNN encode them, and no failure without a GPU."""

from __future__ import annotations

from service.cuda_info import NOT_FOUND, cuda_version_text, cudnn_version_text, read_cuda_info


def test_versions_read_as_cuda_and_cudnn_encode_them() -> None:
    assert cuda_version_text(13000) == "13.0"
    assert cuda_version_text(12080) == "12.8"
    assert cuda_version_text(13010) == "13.1"
    assert cudnn_version_text(92801) == "9.28.1"
    assert cudnn_version_text(90100) == "9.1.0"


def test_without_a_driver_each_part_says_not_found_instead_of_failing() -> None:
    info = read_cuda_info("13.0")
    if info.gpu != NOT_FOUND:  # pragma: no cover - a machine with an NVIDIA driver
        assert info.driver_cuda[0].isdigit()
        return
    assert info.driver_cuda == NOT_FOUND
    assert info.describe().startswith(f"GPU {NOT_FOUND}, CUDA driver {NOT_FOUND}, CUDA runtime ")
