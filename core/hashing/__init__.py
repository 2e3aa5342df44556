"""Hashing work, free of transport: the algorithms (``algorithms``), the two-tier result cache
(``cache``) and the conversions between the wire types and these (``wire``)."""
