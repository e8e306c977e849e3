;; Hostile: passes out-of-bounds and wrapping pointers, and a 1 GiB output
;; buffer, to every function that takes one. Each call must come back with
;; ERR_OUT_OF_BOUNDS (-2); any other answer traps. Then it sets `x-oob: ok`
;; so the test can tell it got that far.
(module
  (import "cistern" "request_get" (func $request_get (param i32 i32 i32) (result i32)))
  (import "cistern" "request_set" (func $request_set (param i32 i32 i32) (result i32)))
  (import "cistern" "header_get" (func $header_get (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "header_names" (func $header_names (param i32 i32 i32) (result i32)))
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "header_add" (func $header_add (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "header_remove" (func $header_remove (param i32 i32 i32) (result i32)))
  (import "cistern" "respond" (func $respond (param i32 i32 i32) (result i32)))
  (import "cistern" "replica_state" (func $replica_state (param i32 i32) (result i32)))
  (import "cistern" "url_by_sha256" (func $url_by_sha256 (param i32 i32 i32 i32) (result i32)))
  (import "cistern" "limiter_check" (func $limiter_check (param i32 i32 i32 i32) (result i32)))
  (import "cistern" "param_get" (func $param_get (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-oob")
  (data (i32.const 16) "ok")
  (data (i32.const 32) "tour")
  (func $expect (param i32)
    (if (i32.ne (local.get 0) (i32.const -2)) (then unreachable)))
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32)
    ;; output buffer running past the end of memory
    (call $expect (call $request_get (i32.const 0) (i32.const 65530) (i32.const 100)))
    ;; a 1 GiB output buffer: refused, never allocated
    (call $expect (call $request_get (i32.const 1) (i32.const 0) (i32.const 0x40000000)))
    (call $expect (call $header_names (i32.const 0) (i32.const 0) (i32.const 0x40000000)))
    ;; pointer 0xffffffff
    (call $expect (call $request_get (i32.const 0) (i32.const -1) (i32.const 2)))
    (call $expect (call $request_set (i32.const 7) (i32.const 65536) (i32.const 1)))
    ;; header name outside memory
    (call $expect (call $header_get (i32.const 0) (i32.const 70000) (i32.const 4)
      (i32.const 0) (i32.const 0) (i32.const 10)))
    ;; lengths that wrap around the address space
    (call $expect (call $header_set (i32.const 0) (i32.const 0) (i32.const -1) (i32.const 16) (i32.const 2)))
    (call $expect (call $header_add (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 16) (i32.const -1)))
    (call $expect (call $header_remove (i32.const 0) (i32.const 65535) (i32.const 2)))
    ;; a 1 GiB body
    (call $expect (call $respond (i32.const 200) (i32.const 0) (i32.const 0x40000000)))
    (call $expect (call $replica_state (i32.const 65535) (i32.const 2)))
    (call $expect (call $url_by_sha256 (i32.const 65530) (i32.const 32) (i32.const 0) (i32.const 10)))
    (call $expect (call $limiter_check (i32.const 32) (i32.const 4) (i32.const 65000) (i32.const 1000)))
    (call $expect (call $param_get (i32.const -16) (i32.const 16) (i32.const 0) (i32.const 0) (i32.const 0)))
    (call $expect (call $log (i32.const 2) (i32.const 65536) (i32.const 1)))
    (drop (call $header_set (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 16) (i32.const 2)))
    i32.const 0))
