;; Hostile: on_request edits a header, then traps (the edit must not apply);
;; on_response divides by zero after editing a response header.
(module
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-trapped")
  (data (i32.const 16) "yes")
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32)
    (drop (call $header_set (i32.const 0) (i32.const 0) (i32.const 9) (i32.const 16) (i32.const 3)))
    unreachable)
  (func (export "on_response") (result i32)
    (drop (call $header_set (i32.const 1) (i32.const 0) (i32.const 9) (i32.const 16) (i32.const 3)))
    (i32.div_u (i32.const 1) (i32.const 0))))
