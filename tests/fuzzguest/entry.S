/* PVH entry of the fuzz guest: 32-bit protected mode, paging off, flat segments,
 * %ebx = physical address of struct hvm_start_info.  Set a stack, call fuzz_main. */
	.section .text.entry, "ax"
	.code32
	.globl _start
_start:
	cli
	movl	$stack_top, %esp
	pushl	%ebx
	call	fuzz_main
1:	hlt
	jmp	1b

	.section .bss
	.align 16
	.space 65536
stack_top:

	.section .note.GNU-stack, "", @progbits
