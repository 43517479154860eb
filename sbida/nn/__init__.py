"""Neural building blocks on periodic grids: convolutions, time embeddings, window encoders and U-Nets, grid flows."""

from .coda_unet import CODAUNet
from .encoders import WindowEncoder
from .flows import GridCoupling, GridFlow, IsotropicStudentT, with_student_t_base
from .layers import FiLM, FourierEmbedding, ResBlock, SinusoidalEmbedding, periodic_conv
from .unet import UNet, UNet1d, UNet2d

__all__ = ["periodic_conv", "SinusoidalEmbedding", "FourierEmbedding", "FiLM", "ResBlock", "WindowEncoder", "UNet",
           "UNet1d", "UNet2d", "CODAUNet", "GridFlow",
           "GridCoupling", "IsotropicStudentT", "with_student_t_base"]
