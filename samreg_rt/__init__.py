"""samreg-rt: training-free ROI-correspondence image registration (SAMReg) on ONNX Runtime."""
__version__ = "0.1.0"
