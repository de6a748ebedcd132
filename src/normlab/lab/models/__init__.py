"""The networks a lab run trains: the small ResNet and the lab's norm names (``resnet``), the
segmentation U-Net (``unet``), and a user's own factory (``user_factory`` loads it without
torch, ``user_model`` builds it with each lab norm).
"""
