# ruff: noqa: E501, W291, W293 (the cells' own long lines and trailing spaces, kept verbatim)
"""fastai/diffusion-nbs textual_inversion_inference.ipynb:
every code cell, verbatim, keyed by its number (1-based, code cells only).

Source: the official notebook at HEAD f565e05 (blob 9055154).
The text of each cell is the notebook's `source`, byte for byte (IPython lines such as `!pip` and
`%wandb` included); tests/test_course.py decides which cells run.
"""

CELLS = {
    1: r'''import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from pathlib import Path''',
    2: r'''torch.manual_seed(1)

def image_grid(imgs, rows=1, cols=None):
    if cols is None: cols = math.ceil(len(imgs)/rows)
    w, h = imgs[0].size
    grid = Image.new('RGB', size=(cols*w, rows*h))
    for i, img in enumerate(imgs): grid.paste(img, box=(i%cols*w, i//cols*h))
    return grid''',
    3: r'''model_nm = "CompVis/stable-diffusion-v1-4"

output_dir="sd-concept-output"
pipe = StableDiffusionPipeline.from_pretrained(output_dir, torch_dtype=torch.float16).to("cuda")''',
    4: r'''num_samples,num_rows = 2,2''',
    5: r'''prompt = "a hyper-realistic high definition render of <tiny> sitting on a pink rug, 4k"
all_images = [] 
for _ in range(num_rows):
    images = pipe([prompt] * num_samples, num_inference_steps=100, guidance_scale=15).images
    all_images.extend(images)''',
    6: r'''image_grid(all_images, num_samples, num_rows)''',
    7: r'''''',
}
