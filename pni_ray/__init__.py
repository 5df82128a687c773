"""pni-ray: PNI anomaly detection (Bae, Lee & Kim, ICCV 2023) from training to the factory floor."""

__version__ = "0.1.0"
