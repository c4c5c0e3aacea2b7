"""spark_gateway: Jupyter kernels started on cluster hosts over SSH, as plain Python or Spark drivers."""

from .provisioner import DistributedProvisioner

__all__ = ["DistributedProvisioner"]
__version__ = "0.1.0"
