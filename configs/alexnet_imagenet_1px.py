"""BVLC AlexNet on ImageNet, 1-pixel non-targeted (Su et al. 2019, Sec. IV-A, Table 2).

Images are resized and centre-cropped to 227x227, so one pixel is 1/51529 of the
input. The sample folder holds one image per tenth class; point `data` at a full
validation folder (or tfds:imagenet2012) for the paper's 600 images.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "alexnet:bvlc_alexnet.npz"
    config.data = "folder:../shared/data/imagenet-sample"
    config.resize = "center_crop"
    config.pixels = 1
    config.targeted = False
    return config
