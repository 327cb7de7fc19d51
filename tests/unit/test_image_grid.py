"""save_image_grid: images land where the layout says, with an optional coloured frame per image."""

import numpy as np
import torch
from PIL import Image

from fastvideo_grpo.training.metrics import save_image_grid


def test_grid_frames_each_image_in_its_own_colour(tmp_path):
    imgs = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 1.0, 0.5)])
    path = tmp_path / "g.png"
    save_image_grid(imgs, path, nrow=2, upscale=1, pad=4, borders=[(0.0, 1.0, 0.0), (1.0, 0.0, 0.0), None])
    a = np.asarray(Image.open(path)).astype(int)
    assert a.shape == (2 * (4 + 4) + 4, 2 * (4 + 4) + 4, 3)
    # image i at (pad + r * (4 + pad), pad + c * (4 + pad)); its frame is pad // 2 = 2 pixels wide
    assert (a[4:8, 4:8] == 0).all() and (a[4:8, 12:16] == 255).all() and (a[12:16, 4:8] == 128).all()
    assert (a[2:4, 2:10] == [0, 255, 0]).all() and (a[8:10, 2:10] == [0, 255, 0]).all()  # green frame, image 0
    assert (a[2:4, 10:18] == [255, 0, 0]).all() and (a[4:8, 16:18] == [255, 0, 0]).all()  # red frame, image 1
    assert (a[10:12, 2:10] == 255).all()  # no frame on image 2: white padding
    plain = tmp_path / "p.png"
    save_image_grid(imgs, plain, nrow=2, upscale=1, pad=4)
    assert (np.asarray(Image.open(plain))[2:4, 2:10] == 255).all()
