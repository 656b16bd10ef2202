"""What a skilled user writes to embed a folder with OpenVINO, as a whole script (the rival row of
bench_embed_cpu.py): the encoder converted once beforehand (`ov.convert_model` + `ov.save_model`),
then per image imread + SamPredictor's own preprocessing + infer, features saved as fp16 .npy.

    python benchmarks/openvino_user_script.py ENCODER.xml IMAGES_DIR OUT_DIR [bf16|f32]
"""

import sys
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import torch
from segment_anything.utils.transforms import ResizeLongestSide

xml, images, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
precision = sys.argv[4] if len(sys.argv) > 4 else "bf16"
out.mkdir(parents=True, exist_ok=True)
request = ov.Core().compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": precision}).create_infer_request()
transform = ResizeLongestSide(1024)
mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
for path in sorted(images.iterdir()):
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    x = (torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1).float() - mean) / std
    x = torch.nn.functional.pad(x, (0, 1024 - x.shape[2], 0, 1024 - x.shape[1]))[None]
    np.save(out / f"{path.stem}.npy", request.infer([x.numpy()])[0][0].astype(np.float16))
