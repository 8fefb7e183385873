"""twistd plugin: ``twistd -n echfront`` (imports nothing else, so --help stays fast)."""

from twisted.application.service import ServiceMaker

echfront = ServiceMaker(
    "echfront",
    "echfront.tap",
    "Encrypted Client Hello (RFC 9849) split-mode TLS front",
    "echfront",
)
