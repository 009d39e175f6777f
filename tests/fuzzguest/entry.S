/* PVH entry of the fuzz guest: 32-bit protected mode, paging off, %ebx = physical address
 * of struct hvm_start_info.  Load a GDT of its own (the PVH ABI does not promise one) and an
 * IDT whose every gate returns at once (an NMI the fuzzing routes to this vCPU through an
 * MSI must not triple-fault it), set a stack and call fuzz_main. */
	.section .text.entry, "ax"
	.code32
	.globl _start
_start:
	cli
	lgdt	gdt_ptr
	ljmp	$0x08, $1f
1:	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	movl	$stack_top, %esp
	/* 256 interrupt gates, all to ignore_interrupt */
	movl	$idt, %edi
	movl	$ignore_interrupt, %eax
	movl	$256, %ecx
2:	movw	%ax, (%edi)
	movw	$0x08, 2(%edi)
	movw	$0x8e00, 4(%edi)
	movl	%eax, %edx
	shrl	$16, %edx
	movw	%dx, 6(%edi)
	addl	$8, %edi
	loop	2b
	lidt	idt_ptr
	pushl	%ebx
	call	fuzz_main
3:	hlt
	jmp	3b

ignore_interrupt:
	iret

	.section .rodata
	.align 8
gdt:
	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08: code, flat 4 GiB, 32-bit */
	.quad	0x00cf92000000ffff	/* 0x10: data, flat 4 GiB */
gdt_end:
gdt_ptr:
	.word	gdt_end - gdt - 1
	.long	gdt
idt_ptr:
	.word	256 * 8 - 1
	.long	idt

	.section .bss
	.align 16
idt:
	.space	256 * 8
	.space	65536
stack_top:

	.section .note.GNU-stack, "", @progbits
