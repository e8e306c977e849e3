;; An interpreter of host calls, for the policy_abi fuzz target: the
;; program is the hex text of request header `x-fuzz`. Each step is one byte
;; (the call, modulo 16) and its i32 arguments, each two bytes little-endian
;; (0..65535: in, across and past the 64 KiB memory's end). Step 15 ends
;; the hook with its next argument as the return code. Both hooks run it.
(module
  (import "cistern" "request_get" (func $request_get (param i32 i32 i32) (result i32)))
  (import "cistern" "request_set" (func $request_set (param i32 i32 i32) (result i32)))
  (import "cistern" "response_status" (func $response_status (result i32)))
  (import "cistern" "header_get" (func $header_get (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "header_names" (func $header_names (param i32 i32 i32) (result i32)))
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "header_add" (func $header_add (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "header_remove" (func $header_remove (param i32 i32 i32) (result i32)))
  (import "cistern" "cache_set" (func $cache_set (param i32 i64) (result i32)))
  (import "cistern" "respond" (func $respond (param i32 i32 i32) (result i32)))
  (import "cistern" "replica_state" (func $replica_state (param i32 i32) (result i32)))
  (import "cistern" "url_by_sha256" (func $url_by_sha256 (param i32 i32 i32 i32) (result i32)))
  (import "cistern" "limiter_check" (func $limiter_check (param i32 i32 i32 i32) (result i32)))
  (import "cistern" "param_get" (func $param_get (param i32 i32 i32 i32 i32) (result i32)))
  (import "cistern" "log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; Names worth calling things by, at fixed offsets the fuzzer can find.
  (data (i32.const 0) "x-fuzz")
  (data (i32.const 16) "location")
  (data (i32.const 32) "content-length")
  (data (i32.const 48) "http://fuzz.test/elsewhere?q=1")
  (data (i32.const 96) "limited")
  (data (i32.const 112) "greeting")
  (data (i32.const 128) "transfer-encoding")
  (data (i32.const 160) "\00\0d\0a\ff\80bad value")
  (global $pc (mut i32) (i32.const 0))
  (global $end (mut i32) (i32.const 0))
  (func (export "cistern_abi_version") (result i32) (i32.const 1))
  (func $hex (param $c i32) (result i32)
    (if (result i32) (i32.le_u (local.get $c) (i32.const 57))
      (then (i32.and (i32.sub (local.get $c) (i32.const 48)) (i32.const 15)))
      (else (i32.and (i32.sub (local.get $c) (i32.const 87)) (i32.const 15)))))
  ;; The program: header x-fuzz into 0x1000.., decoded into 0x8000..; its length.
  (func $load (result i32)
    (local $n i32) (local $i i32)
    (local.set $n (call $header_get (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 0)
                                    (i32.const 0x1000) (i32.const 0x6000)))
    (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return (i32.const 0))))
    (if (i32.gt_u (local.get $n) (i32.const 0x6000)) (then (local.set $n (i32.const 0x6000))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (i32.add (local.get $i) (i32.const 1)) (local.get $n)))
        (i32.store8
          (i32.add (i32.const 0x8000) (i32.shr_u (local.get $i) (i32.const 1)))
          (i32.or
            (i32.shl (call $hex (i32.load8_u (i32.add (i32.const 0x1000) (local.get $i)))) (i32.const 4))
            (call $hex (i32.load8_u (i32.add (i32.const 0x1001) (local.get $i))))))
        (local.set $i (i32.add (local.get $i) (i32.const 2)))
        (br $next)))
    (i32.shr_u (local.get $n) (i32.const 1)))
  ;; The next argument, 0 past the end of the program.
  (func $arg (result i32)
    (local $v i32)
    (if (i32.gt_u (i32.add (global.get $pc) (i32.const 2)) (global.get $end))
      (then (global.set $pc (global.get $end)) (return (i32.const 0))))
    (local.set $v (i32.load16_u (i32.add (i32.const 0x8000) (global.get $pc))))
    (global.set $pc (i32.add (global.get $pc) (i32.const 2)))
    (local.get $v))
  (func $run (result i32)
    (local $op i32)
    (global.set $pc (i32.const 0))
    (global.set $end (call $load))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (global.get $pc) (global.get $end)))
        (local.set $op (i32.and (i32.load8_u (i32.add (i32.const 0x8000) (global.get $pc))) (i32.const 15)))
        (global.set $pc (i32.add (global.get $pc) (i32.const 1)))
        (block $b15 (block $b14 (block $b13 (block $b12 (block $b11 (block $b10 (block $b9 (block $b8 (block $b7 (block $b6 (block $b5 (block $b4 (block $b3 (block $b2 (block $b1 (block $b0
          (br_table $b0 $b1 $b2 $b3 $b4 $b5 $b6 $b7 $b8 $b9 $b10 $b11 $b12 $b13 $b14 $b15 (local.get $op)))
        ;; 0: request_get
        (drop (call $request_get (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 1: request_set
        (drop (call $request_set (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 2: response_status
        (drop (call $response_status)) (br $next))
        ;; 3: header_get
        (drop (call $header_get (call $arg) (call $arg) (call $arg) (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 4: header_names
        (drop (call $header_names (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 5: header_set
        (drop (call $header_set (call $arg) (call $arg) (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 6: header_add
        (drop (call $header_add (call $arg) (call $arg) (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 7: header_remove
        (drop (call $header_remove (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 8: cache_set
        (drop (call $cache_set (call $arg) (i64.extend_i32_s (i32.sub (call $arg) (i32.const 32768))))) (br $next))
        ;; 9: respond
        (drop (call $respond (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 10: replica_state
        (drop (call $replica_state (call $arg) (call $arg))) (br $next))
        ;; 11: url_by_sha256
        (drop (call $url_by_sha256 (call $arg) (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 12: limiter_check
        (drop (call $limiter_check (call $arg) (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 13: param_get
        (drop (call $param_get (call $arg) (call $arg) (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 14: log
        (drop (call $log (call $arg) (call $arg) (call $arg))) (br $next))
        ;; 15: end the hook with a return code
        (return (call $arg))))
    (i32.const 0))
  (func (export "on_request") (result i32) (call $run))
  (func (export "on_response") (result i32) (call $run)))
