"""Delivery: taking spooled messages to upstream providers, with retries.

Nothing outside this package imports aiosmtplib or dnspython.
"""
