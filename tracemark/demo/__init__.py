"""The bundled demo: a small order-processing shop with markers in it (see :mod:`.shop`)."""
