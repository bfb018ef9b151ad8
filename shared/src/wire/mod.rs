//! The wire protocol (DESIGN §5). (Stub: the wire helper builds the messages and codec here.)
