"""Network findings Defender has no event type for: scans, address conflicts, rogue DHCP, cleartext logins."""
