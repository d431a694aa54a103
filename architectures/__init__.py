"""Network classes of nnunet-ext, referenced from plans files by dotted path
(``nnunet_ext.architectures.<module>.<Class>``; nnU-Net resolves them with ``pydoc.locate``)."""
