;; A version-1 guest, unchanged since version 1: sets `x-v1: ran` on the
;; upstream response. Runs beside version-2 guests on a host that speaks 2.
(module
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-v1")
  (data (i32.const 16) "ran")
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_response") (result i32)
    (call $header_set (i32.const 1) (i32.const 0) (i32.const 4) (i32.const 16) (i32.const 3))))
