"""Previews: the grid layout and the GIF/MP4 files read back with the right frame count."""

import imageio.v3 as iio
import numpy as np
import torch

from pipeline.io.media import save_curves, save_video_grid, video_grid


def test_grid_places_each_video():
    v = -torch.ones(3, 2, 3, 4, 4)
    v[1, :, 0] = 1  # video 1 red
    g = video_grid(v, cols=2, scale=1, pad=1)
    assert g.shape == (2, 2 * 5 + 1, 2 * 5 + 1, 3)
    assert (g[:, 1:5, 6:10, 0] == 255).all() and (g[:, 1:5, 1:5, 0] == 0).all()
    assert (g[:, 6:10, 6:10] == 255).all()  # the empty fourth cell stays white padding


def test_gif_and_mp4_round_trip(tmp_path):
    v = torch.rand(4, 5, 3, 16, 16) * 2 - 1
    gif = iio.imread(save_video_grid(v, tmp_path / "p.gif"), index=None)
    assert gif.shape[0] == 5
    mp4 = np.stack(list(iio.imiter(save_video_grid(v, tmp_path / "p.mp4"))))
    assert mp4.shape[0] == 5


def test_curves_png(tmp_path):
    p = save_curves(tmp_path / "c.png", [1, 2, 3], {"a": [0.1, 0.5, 0.9]}, "x", "y")
    assert iio.imread(p).shape[-1] in (3, 4)
