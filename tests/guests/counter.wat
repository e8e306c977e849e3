;; Counts its calls in a global and reports the count (mod 10) in
;; `x-count`: shows what state carries between requests in each isolation
;; mode.
(module
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $calls (mut i32) (i32.const 0))
  (data (i32.const 0) "x-count")
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store8 (i32.const 16)
      (i32.add (i32.const 48) (i32.rem_u (global.get $calls) (i32.const 10))))
    (drop (call $header_set (i32.const 0) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 1)))
    i32.const 0))
