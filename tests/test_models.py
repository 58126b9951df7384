from __future__ import annotations

import pytest

from utils import models


def test_seed_cnn_parameter_count():
    model = models.build_seed_cnn()
    assert model.count_params() == models.SEED_CNN_PARAMS == 356_810


def test_layer_table_totals_match_keras():
    model = models.build_seed_cnn()
    table = models.layer_table(model)
    total = table.iloc[-1]
    assert total["layer"] == "TOTAL"
    assert total["params"] == model.count_params()
    assert total["param bytes"] == 4 * model.count_params()
    conv1 = table.set_index("layer").loc["conv1"]
    assert conv1["output shape"] == "(30, 30, 32)"
    assert conv1["activation bytes/image"] == 30 * 30 * 32 * 4


def test_conv_flops_match_a_hand_count():
    # conv1 of the seed CNN: 3x3 kernel over 3 input channels -> 27 multiply-adds per output
    # value; the output is 30x30x32 = 28,800 values; 2 FLOPs per multiply-add.
    hand = 2 * (3 * 3 * 3) * (30 * 30 * 32)
    assert hand == 1_555_200
    assert models.conv2d_flops(30, 30, 3, 32, 3, 3) == hand
    table = models.layer_table(models.build_seed_cnn()).set_index("layer")
    assert table.loc["conv1", "FLOPs/image"] == hand


def test_dense_flops_match_a_hand_count():
    table = models.layer_table(models.build_seed_cnn()).set_index("layer")
    assert table.loc["dense1", "FLOPs/image"] == 2 * 2048 * 128
    assert table.loc["pool1", "FLOPs/image"] == 0


def test_width_multiplier_scales_layers():
    wide = models.build_seed_cnn(width=2.0)
    assert wide.get_layer("conv1").filters == 64
    assert wide.get_layer("dense1").units == 256
    assert wide.count_params() > 3 * models.SEED_CNN_PARAMS
    with pytest.raises(ValueError, match="width"):
        models.build_seed_cnn(width=0)
