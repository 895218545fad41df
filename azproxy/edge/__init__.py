"""The edge: how a request arrived (reverse, absolute-URI, tunnel), turned into one `IncomingRequest`."""
